//! The control plane under failure, against a real kube-apiserver + etcd with `refleet
//! operator` running as real processes (two replicas on one Lease, so the leader can be
//! SIGKILLed: no Lease release, its streams cut mid-flight) and the kubelet stand-in running
//! real reflectors:
//!
//! - the leader is killed while a live move is in flight (the source reflector frozen with
//!   SIGSTOP, so the hand-off is asked but not yet answered): the standby takes over,
//!   finishes the move, and the shard ends on exactly one reflector — the target — where
//!   its clients, sent on with 4003, rejoin on the same timeline.
//!
//! Skips (with a message) when the binaries are missing, unless `REFLEET_REQUIRE_KUBE=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{Patch, PatchParams};
use nix::sys::signal::Signal;
use refleet_operator::crd::{Session, ShardPhase};
use serde_json::{Value, json};

mod support;
use support::fixtures::{lease_holder, moving_pool, start_lobby};
use support::operator_process::{LeaderService, OperatorProcess, signal};
use support::stand_in::{
    Reflectors, Termination, address_of, closed_with, join_sync, kubelet, record_moving_to,
    tempfile_dir,
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
    let port = std::net::TcpListener::bind("127.0.0.10:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reflectors = Arc::new(Reflectors::default());
    let addrs = Arc::new(Mutex::new(HashMap::new()));
    let kubelet = tokio::spawn(kubelet(
        Api::namespaced(admin.clone(), ns),
        reflectors.clone(),
        addrs.clone(),
        port,
        storage.clone(),
        true,
        Termination::Immediate,
    ));

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
    let (sessions, source) = start_lobby(&admin, ns, &arena).await;
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
    let source_pid = reflectors.children.lock().unwrap()[&source].id().unwrap();
    signal(source_pid, Signal::SIGSTOP);
    let saw_moving: Arc<Mutex<Option<String>>> = Arc::default();
    let watch = tokio::spawn(record_moving_to(
        sessions.clone(),
        "lobby",
        saw_moving.clone(),
    ));
    sessions
        .patch(
            "lobby",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"refleet.dev/move-shard": "lobby"}}}),
            ),
        )
        .await
        .unwrap();
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
    kubelet.abort();
    drop(reflectors);
    let _ = std::fs::remove_dir_all(&storage);
    eprintln!(
        "leader killed with a move in flight: landed {landed_after:?} after the kill; test took {:?}",
        started.elapsed()
    );
}
