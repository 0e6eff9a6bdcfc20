//! The control plane under failure, against a real kube-apiserver + etcd with `refleet
//! operator` running as real processes (two replicas on one Lease, so the leader can be
//! SIGKILLed: no Lease release, its streams cut mid-flight) and the kubelet stand-in running
//! real reflectors:
//!
//! - the leader is killed while a live move is in flight (the source reflector frozen with
//!   SIGSTOP, so the hand-off is asked but not yet answered): the standby takes over,
//!   finishes the move, and the shard ends on exactly one reflector — the target — where
//!   its clients, sent on with 4003, rejoin on the same timeline;
//! - the kube-apiserver is stopped for 30 s (etcd stays): the router answers every
//!   Route and ListShards call from its last view, the reflectors keep serving (a user joins
//!   meanwhile), the operator process stays up; once the apiserver is back the operator
//!   catches up (that user is in the Session's status) and no pod was deleted or replaced;
//! - the watch caches the syncs read follow the apiserver across a restart: a pod and a
//!   Session and a Service created after it came back, and a pod deleted then, show in the
//!   cache.
//!
//! Skips (with a message) when the binaries are missing, unless `REFLEET_REQUIRE_KUBE=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use nix::sys::signal::Signal;
use refleet_operator::crd::{Session, ShardPhase};
use serde_json::Value;

mod support;
use support::fixtures::{ask_move, lease_holder, moving_pool, start_lobby};
use support::operator_process::{LeaderService, OperatorProcess, signal};
use support::stand_in::{
    StandIn, Termination, address_of, closed_with, join_sync, record_moving_to, tempfile_dir,
};
use support::{admin_client, eventually, prepare, start_kube};

/// The sessions reflector `addr` hosts, by name (`<app>/<shard>`), with their user counts
/// (its `GET /sessions`, open to loopback callers).
async fn hosted(addr: SocketAddr) -> HashMap<String, u64> {
    let body: Value = reqwest::get(format!("http://{addr}/sessions"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s["users"].as_u64()?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_killed_while_a_move_is_in_flight_leaves_the_shard_on_the_target_only() {
    let Some((_kube, kubeconfig)) = start_kube("failover-move", 5) else {
        return;
    };
    let started = Instant::now();
    refleet_operator::controller::install_crypto_provider();
    let admin = admin_client(&kubeconfig).await;
    let ns = "refleet-failover";
    prepare(&admin, ns).await;
    let storage = tempfile_dir().join("failover-move");
    std::fs::create_dir_all(&storage).unwrap();

    // The kubelet stand-in: real reflectors on one shared store, as moves need.
    let stand_in = StandIn::start(&admin, ns, storage.clone(), true, Termination::Immediate);
    let addrs = stand_in.addrs.clone();

    // Two operator processes behind one report "Service"; a leads before b starts.
    let report = LeaderService::start(admin.clone(), ns).await;
    let mut a = OperatorProcess::start(&kubeconfig, ns, "op-a", &report.url());
    report.add("op-a", a.report);
    eventually("op-a to lead", Duration::from_secs(30), || {
        let admin = admin.clone();
        async move { (lease_holder(&admin, ns).await? == "op-a").then_some(()) }
    })
    .await;
    let b = OperatorProcess::start(&kubeconfig, ns, "op-b", &report.url());
    report.add("op-b", b.report);

    let mut arena = moving_pool();
    arena.spec.defaults.min_reflectors = Some(2);
    arena.spec.defaults.max_reflectors = Some(3);
    let (sessions, source) = start_lobby(&admin, ns, &arena, 10).await;
    eventually("two reflectors reporting", Duration::from_secs(30), || {
        let a = &a;
        async move {
            (a.metric("refleet_report_streams{region=\"eu\"}").await? == 2.0).then_some(())
        }
    })
    .await;
    let source_addr = address_of(&addrs, &source).await;
    let mut clients = Vec::new();
    let mut timeline = Value::Null;
    for u in 0..3 {
        let (ws, sync) = join_sync(source_addr, "lobby-0", "app", "lobby", &format!("u{u}")).await;
        timeline = sync["timeline"].clone();
        clients.push(ws);
    }
    assert!(timeline.is_string(), "SYNC carries a timeline: {timeline}");

    // Freeze the source, so the hand-off the leader asks for stays unanswered; then ask.
    let source_pid = stand_in.pid(&source);
    signal(source_pid, Signal::SIGSTOP);
    let saw_moving: Arc<Mutex<Option<String>>> = Arc::default();
    let watch = tokio::spawn(record_moving_to(
        sessions.clone(),
        "lobby",
        saw_moving.clone(),
    ));
    ask_move(&sessions, "lobby").await;
    let planned_to = eventually("the status to show Moving", Duration::from_secs(20), || {
        let saw = saw_moving.lock().unwrap().clone();
        async move { saw }
    })
    .await;
    eventually(
        "the move in flight at op-a",
        Duration::from_secs(10),
        || {
            let a = &a;
            async move { (a.metric("refleet_router_moves_in_flight").await? == 1.0).then_some(()) }
        },
    )
    .await;

    // The leader dies with the move in flight; the source wakes up.
    a.kill();
    let killed = Instant::now();
    signal(source_pid, Signal::SIGCONT);
    let closes: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(closed_with(ws, 4003, Duration::from_secs(60))))
        .collect();

    // The standby takes over and the shard lands on the target, once.
    eventually("op-b to lead", Duration::from_secs(20), || {
        let admin = admin.clone();
        async move { (lease_holder(&admin, ns).await? == "op-b").then_some(()) }
    })
    .await;
    let target = eventually(
        "the shard to land on the target",
        Duration::from_secs(60),
        || {
            let sessions = sessions.clone();
            let source = source.clone();
            async move {
                let st = sessions.get("lobby").await.ok()?.status?;
                let shard = st.shards.iter().find(|s| s.name == "lobby")?;
                (!shard.reflector.is_empty()
                    && shard.reflector != source
                    && shard.state != ShardPhase::Moving
                    && shard.moving_to.is_none())
                .then(|| shard.reflector.clone())
            }
        },
    )
    .await;
    let landed_after = killed.elapsed();
    watch.abort();
    assert_eq!(target, planned_to, "it lands where it was planned to go");
    for c in closes {
        assert!(c.await.unwrap(), "the source sent its clients on with 4003");
    }

    // The clients rejoin at the target on the same timeline (a seamless rejoin: nothing
    // rebuilt); the source hosts nothing of the shard any more.
    let target_addr = address_of(&addrs, &target).await;
    let mut rejoined = Vec::new();
    for u in 0..3 {
        let (ws, sync) = join_sync(target_addr, "lobby-0", "app", "lobby", &format!("u{u}")).await;
        assert_eq!(
            sync["timeline"], timeline,
            "u{u} rejoined the same timeline"
        );
        rejoined.push(ws);
    }
    assert!(
        !hosted(source_addr).await.contains_key("app/lobby"),
        "the source no longer hosts the shard"
    );
    assert_eq!(
        hosted(target_addr).await.get("app/lobby"),
        Some(&3),
        "the target hosts it with its three users"
    );
    let failed = b
        .metric("refleet_router_moves_total{outcome=\"failed\"}")
        .await;
    assert_ne!(failed, Some(1.0), "op-b: {}", b.log_tail());
    let landed = b
        .metric("refleet_router_moves_total{outcome=\"landed\"}")
        .await;
    assert_eq!(landed, Some(1.0), "op-b landed the move: {}", b.log_tail());
    // No Session or pod was lost on the way.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    assert!(pods.get_opt(&target).await.unwrap().is_some());
    assert!(
        Api::<Session>::namespaced(admin.clone(), ns)
            .get_opt("lobby")
            .await
            .unwrap()
            .is_some()
    );

    drop(rejoined);
    drop(stand_in);
    let _ = std::fs::remove_dir_all(&storage);
    eprintln!(
        "leader killed with a move in flight: landed {landed_after:?} after the kill; test took {:?}",
        started.elapsed()
    );
}

/// `GET /v1/route` at the router `router`: the shard it answers, or why not.
async fn route(router: SocketAddr, ns: &str, session: &str) -> Result<String, String> {
    let res = reqwest::Client::new()
        .get(format!(
            "http://{router}/v1/route?namespace={ns}&session={session}"
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let body: Value = res.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    body["shard"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no shard in {body}"))
}

/// `GET /v1/shards` at the router `router` (ListShards): the shards it answers with their
/// users, or why not.
async fn list_shards(
    router: SocketAddr,
    ns: &str,
    session: &str,
) -> Result<Vec<(String, u64)>, String> {
    let res = reqwest::Client::new()
        .get(format!(
            "http://{router}/v1/shards?namespace={ns}&session={session}"
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = res.status();
    let body: Value = res.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    Ok(body["shards"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["shard"].as_str()?.to_owned(), s["users"].as_u64()?)))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_apiserver_is_down_for_30s_the_router_answers_and_no_live_pod_is_deleted() {
    let Some((kube, kubeconfig)) = start_kube("failover-apiserver", 6) else {
        return;
    };
    refleet_operator::controller::install_crypto_provider();
    let admin = admin_client(&kubeconfig).await;
    let ns = "refleet-outage";
    prepare(&admin, ns).await;
    let storage = tempfile_dir().join("failover-apiserver");
    std::fs::create_dir_all(&storage).unwrap();
    let stand_in = StandIn::start(&admin, ns, storage.clone(), false, Termination::Immediate);
    let addrs = stand_in.addrs.clone();
    // One replica; its router and report stream reached directly (a Service keeps its
    // endpoints while the apiserver is down).
    let report = LeaderService::start(admin.clone(), ns).await;
    // A short token TTL: a new leader's warm-up (shards it did not open count as full,
    // since the old leader's tokens may still fill them) lasts one TTL.
    let op = OperatorProcess::start_with(
        &kubeconfig,
        ns,
        "op-only",
        &report.url(),
        &["--token-ttl=3s"],
    );
    report.add("op-only", op.report);
    let mut arena = support::fixtures::pool("arena");
    arena.spec.defaults.min_reflectors = Some(2);
    // Room for every reservation the Route calls below make.
    let (sessions, host) = start_lobby(&admin, ns, &arena, 500).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    eventually("two reflectors reporting", Duration::from_secs(30), || {
        let op = &op;
        async move {
            (op.metric("refleet_report_streams{region=\"eu\"}").await? == 2.0).then_some(())
        }
    })
    .await;
    let host_addr = address_of(&addrs, &host).await;
    let (first, _) = join_sync(host_addr, "lobby-0", "app", "lobby", "u0").await;
    eventually("the user counted", Duration::from_secs(20), || {
        let sessions = sessions.clone();
        async move { (sessions.get("lobby").await.ok()?.status?.users == 1).then_some(()) }
    })
    .await;
    let pods_before: Vec<(String, String)> = pod_ids(&pods).await;
    assert_eq!(pods_before.len(), 2, "{pods_before:?}");

    // The outage: Route keeps answering from the router's last view, the reflectors keep
    // serving (a user joins meanwhile), and the operator process stays up.
    assert_eq!(
        list_shards(op.router, ns, "lobby").await,
        Ok(vec![("lobby".to_owned(), 1)]),
        "the router answers before the outage"
    );
    eventually(
        "Route to answer (after the warm-up)",
        Duration::from_secs(20),
        || {
            let router = op.router;
            async move { route(router, ns, "lobby").await.ok() }
        },
    )
    .await;
    kube.stop_apiserver();
    let down = Instant::now();
    let (mut answered, mut refused) = (0, Vec::new());
    let mut during = None;
    while down.elapsed() < Duration::from_secs(30) {
        match list_shards(op.router, ns, "lobby").await {
            Ok(shards) => {
                assert_eq!(shards.len(), 1, "{shards:?}");
                assert_eq!(shards[0].0, "lobby");
                answered += 1;
            }
            Err(e) => refused.push(e),
        }
        match route(op.router, ns, "lobby").await {
            Ok(shard) => {
                assert_eq!(shard, "lobby");
                answered += 1;
            }
            Err(e) => refused.push(e),
        }
        if during.is_none() && down.elapsed() > Duration::from_secs(5) {
            during = Some(
                join_sync(host_addr, "lobby-0", "app", "lobby", "u1")
                    .await
                    .0,
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        refused.is_empty(),
        "the router answered {answered} times and refused {} times during the outage: {:?}\n{}",
        refused.len(),
        refused.first(),
        op.log_tail()
    );
    assert!(
        op.metric("refleet_operator_leader").await.is_some(),
        "the operator is up"
    );

    // Back: the operator catches up (the user who joined meanwhile is counted) and no pod
    // that hosts live sessions was deleted or replaced.
    kube.start_apiserver();
    let admin = admin_client(&kubeconfig).await;
    let sessions: Api<Session> = Api::namespaced(admin.clone(), ns);
    eventually("the operator to catch up", Duration::from_secs(60), || {
        let sessions = sessions.clone();
        async move { (sessions.get("lobby").await.ok()?.status?.users == 2).then_some(()) }
    })
    .await;
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        pod_ids(&pods).await,
        pods_before,
        "the same pods, none replaced"
    );
    assert_eq!(
        list_shards(op.router, ns, "lobby").await,
        Ok(vec![("lobby".to_owned(), 2)])
    );
    eprintln!(
        "apiserver down 30 s: the router answered {answered} of {answered} ListShards and Route calls; {:?} after the outage began the status had caught up",
        down.elapsed()
    );
    drop((first, during));
    drop(stand_in);
    let _ = std::fs::remove_dir_all(&storage);
}

/// Every pod of the namespace as (name, uid), sorted.
async fn pod_ids(pods: &Api<Pod>) -> Vec<(String, String)> {
    let mut ids: Vec<(String, String)> = pods
        .list(&kube::api::ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| {
            (
                p.metadata.name.unwrap_or_default(),
                p.metadata.uid.unwrap_or_default(),
            )
        })
        .collect();
    ids.sort();
    ids
}

fn labelled_pod(name: &str, pool: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "labels": { "refleet.dev/pool": pool } },
        "spec": {
            "automountServiceAccountToken": false,
            "containers": [{ "name": "reflector", "image": "refleet-reflector:test" }],
        },
    }))
    .unwrap()
}

fn names<K: kube::ResourceExt>(objects: &[K]) -> Vec<String> {
    objects.iter().map(kube::ResourceExt::name_any).collect()
}

fn pod_names(pods: &[std::sync::Arc<k8s_openapi::api::core::v1::Pod>]) -> Vec<String> {
    pods.iter()
        .map(|p| kube::ResourceExt::name_any(&**p))
        .collect()
}

/// A sync reads only the watch caches, so a cache that stopped following the apiserver after
/// a restart would make the operator re-create pods it cannot see, every sync. After the
/// kube-apiserver is killed and started again, what changes afterwards reaches the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_caches_follow_the_apiserver_across_a_restart() {
    use kube::api::{DeleteParams, PostParams};
    use refleet_operator::controller::cache::Cache;
    use refleet_operator::crd::ReflectorPool;

    refleet_operator::controller::install_crypto_provider();
    let Some((kube, kubeconfig)) = start_kube("cache-restart", 7) else {
        return;
    };
    let admin = admin_client(&kubeconfig).await;
    let ns = "cache";
    prepare(&admin, ns).await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let sessions: Api<Session> = Api::namespaced(admin.clone(), ns);
    let pools: Api<ReflectorPool> = Api::namespaced(admin.clone(), ns);
    let post = PostParams::default();
    pods.create(&post, &labelled_pod("arena-eu-0", "arena"))
        .await
        .unwrap();
    // Not a reflector pod (no pool label): never cached.
    let mut other = labelled_pod("bystander", "arena");
    other.metadata.labels = None;
    pods.create(&post, &other).await.unwrap();
    pools
        .create(&post, &support::fixtures::pool("arena"))
        .await
        .unwrap();

    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(admin.clone(), ns);
    let (cache, watches) = Cache::watch(
        pools.clone(),
        sessions.clone(),
        pods.clone(),
        services.clone(),
    );
    tokio::time::timeout(Duration::from_secs(30), cache.ready())
        .await
        .expect("first lists within 30 s")
        .unwrap();
    assert_eq!(pod_names(&cache.pods_of(ns, "arena")), ["arena-eu-0"]);
    assert!(cache.pool(ns, "arena").is_some());

    kube.stop_apiserver();
    tokio::time::sleep(Duration::from_secs(2)).await;
    kube.start_apiserver();
    let back = Instant::now();

    pods.create(&post, &labelled_pod("arena-eu-1", "arena"))
        .await
        .unwrap();
    pods.delete("arena-eu-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let lobby: Session = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "lobby" },
        "spec": { "poolRef": { "name": "arena" }, "appId": "app", "name": "lobby" },
    }))
    .unwrap();
    sessions.create(&post, &lobby).await.unwrap();
    let service: k8s_openapi::api::core::v1::Service = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "arena-eu-1", "labels": { "refleet.dev/pool": "arena" } },
        "spec": { "ports": [{ "port": 7070 }] },
    }))
    .unwrap();
    services.create(&post, &service).await.unwrap();

    eventually(
        "the cache to show the pod and Session created and the pod deleted after the restart",
        Duration::from_secs(60),
        || {
            let cache = cache.clone();
            async move {
                let pods = pod_names(&cache.pods_of(ns, "arena"));
                let sessions = names(&cache.sessions_of(ns, "arena"));
                let services = names(&cache.services_of(ns, "arena"));
                (pods == ["arena-eu-1"] && sessions == ["lobby"] && services == ["arena-eu-1"])
                    .then_some(())
            }
        },
    )
    .await;
    eprintln!(
        "the cache caught up {:?} after the apiserver was back",
        back.elapsed()
    );
    drop(watches);
}
