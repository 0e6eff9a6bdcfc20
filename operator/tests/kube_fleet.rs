//! Against a real kube-apiserver + etcd (scripts/kube-local), each test on its own:
//!
//! - two operator instances on one Lease elect exactly one leader; when it stops, the other
//!   takes over within the lease duration and reconciles a pool created after the handover;
//! - four instances starting at the same moment on a Lease that does not exist yet: never
//!   more than one leads, and one does;
//! - a kubelet stand-in runs a real `refleet-reflector` process per reflector pod (on its
//!   own loopback address), the operator reads their load with `HttpLoad`, and real
//!   protocol-level clients joining shard 0 past the Session's threshold make the operator
//!   record the users and open shard `<name>~1`; each reflector opens its report stream with
//!   the credential the operator put in its pod, and none is refused;
//! - on the same rig with moves on, a `refleet.dev/move-shard` annotation moves a live shard:
//!   the Session's status shows it `Moving` (with `movingTo`) and then on the other
//!   reflector, a `ShardMoving` Event is recorded, the source closes its clients with 4003,
//!   and when the target's pod disappears the shard is placed again (`ShardReassigned`);
//! - with pods bound to a stand-in node (so a deleted pod terminates as under a kubelet:
//!   SIGTERM, removed once its process exits), an image roll-over moves the old reflector's
//!   live shard to the new one (`ShardMoving … ReflectorDraining`, 4003) without waiting out
//!   its 30 s drain.
//!
//! Skips (with a message) when the binaries are missing, unless `REFLEET_REQUIRE_KUBE=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use refleet_operator::cli::operator::{LogFormat, OperatorArgs, serve};
use refleet_operator::cli::routing::RoutingArgs;
use refleet_operator::controller::observe::{HttpLoad, LoadSource, NoLoad};
use refleet_operator::crd::{ReflectorPool, Session, ShardPhase};
use serde_json::json;

mod support;
use support::fixtures::{
    ask_move, create_and_place, lease_holder, moving_pool, pool, start_lobby, wait_pod,
};
use support::stand_in::{
    StandIn, Termination, address_of, closed_with, events_with_reason, join, keep_reading,
    record_moving_to, tempfile_dir,
};
use support::{admin_client, eventually, prepare, start_kube};

// ---------------------------------------------------------------------------------------
// In-process operators

struct Operator {
    identity: String,
    metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Operator {
    async fn start(
        client: Client,
        ns: &str,
        identity: &str,
        lease_duration: Duration,
        load: Arc<dyn LoadSource>,
        routing: RoutingArgs,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = listener.local_addr().unwrap();
        let args = OperatorArgs {
            namespaces: vec![ns.to_owned()],
            lease_name: "refleet-operator".to_owned(),
            lease_namespace: Some(ns.to_owned()),
            identity: Some(identity.to_owned()),
            lease_duration: lease_duration.into(),
            lease_renew_before: Duration::from_secs(1).into(),
            metrics_listen: metrics,
            resync: Duration::from_secs(1).into(),
            status_counts_every: Duration::from_secs(2).into(),
            min_sync_interval: Duration::from_secs(1).into(),
            log_format: LogFormat::Text,
            routing,
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(client, args, listener, load, async move {
            let _ = stop_rx.await;
        }));
        Self {
            identity: identity.to_owned(),
            metrics,
            stop: Some(stop),
            task,
        }
    }

    async fn metrics_text(&self) -> Option<String> {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// `refleet_operator_leader` as this instance reports it.
    async fn leader_gauge(&self) -> Option<f64> {
        let text = self.metrics_text().await?;
        text.lines()
            .find_map(|l| l.strip_prefix("refleet_operator_leader "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Stops the instance (it releases the Lease) and waits for it.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .expect("operator stops")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_hands_over_to_the_standby_which_then_reconciles() {
    let Some((_kube, kubeconfig)) = start_kube("lease", 1) else {
        return;
    };
    let started = Instant::now();
    refleet_operator::controller::install_crypto_provider();
    let admin = admin_client(&kubeconfig).await;
    let ns = "refleet-lease";
    prepare(&admin, ns).await;
    let lease_duration = Duration::from_secs(4);

    let start = |id| {
        Operator::start(
            admin.clone(),
            ns,
            id,
            lease_duration,
            Arc::new(NoLoad),
            RoutingArgs::loopback(),
        )
    };
    let a = start("it-a").await;
    let b = start("it-b").await;

    // Exactly one leads: the Lease names it and only its gauge says 1.
    let holder = eventually("a leader", Duration::from_secs(20), || {
        let admin = admin.clone();
        let (a, b) = (&a, &b);
        async move {
            let holder = lease_holder(&admin, ns).await?;
            let (ga, gb) = (a.leader_gauge().await?, b.leader_gauge().await?);
            let want = |op: &Operator| if op.identity == holder { 1.0 } else { 0.0 };
            (ga == want(a) && gb == want(b)).then_some(holder)
        }
    })
    .await;
    // It stays exactly one over a few renewals.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(lease_holder(&admin, ns).await.as_deref(), Some(&*holder));
        let gauges = (a.leader_gauge().await, b.leader_gauge().await);
        assert!(
            matches!(gauges, (Some(1.0), Some(0.0)) | (Some(0.0), Some(1.0))),
            "{gauges:?}"
        );
    }
    let (leader, standby) = if a.identity == holder { (a, b) } else { (b, a) };

    // The leader reconciles.
    let pools: Api<ReflectorPool> = Api::namespaced(admin.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    pools
        .create(&PostParams::default(), &pool("first"))
        .await
        .unwrap();
    wait_pod(&pods, "first-eu-0", Duration::from_secs(20)).await;

    // Stop the leader: the standby takes over within the lease duration.
    let stopped = Instant::now();
    leader.stop().await;
    eventually("the standby to lead", lease_duration, || {
        let admin = admin.clone();
        let standby = &standby;
        async move {
            let holder = lease_holder(&admin, ns).await?;
            (holder == standby.identity && standby.leader_gauge().await? == 1.0).then_some(())
        }
    })
    .await;
    let handover = stopped.elapsed();
    assert!(handover < lease_duration, "handover took {handover:?}");

    // The new leader reconciles: a pool created after the handover gets its pod, and the
    // old pool keeps its one pod.
    pools
        .create(&PostParams::default(), &pool("second"))
        .await
        .unwrap();
    let pod = wait_pod(&pods, "second-eu-0", Duration::from_secs(20)).await;
    assert_eq!(
        pod.metadata.owner_references.unwrap()[0].name,
        "second",
        "owned by its pool"
    );
    let first: Vec<String> = pods
        .list(&ListParams::default().labels("refleet.dev/pool=first"))
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(first, vec!["first-eu-0".to_owned()]);
    // No failed reconciliation: every error series (they exist from start-up at 0) is 0.
    let body = standby.metrics_text().await.unwrap();
    assert!(
        body.lines()
            .filter(|l| l.starts_with("refleet_operator_reconcile_errors_total{"))
            .all(|l| l.ends_with(" 0")),
        "{body}"
    );

    standby.stop().await;
    eprintln!(
        "handover in {handover:?}; lease test took {:?}",
        started.elapsed()
    );
}

/// A namespace with a kubelet stand-in running real reflector processes and an in-process
/// operator whose router takes their report streams (each with its pod's credential).
struct Rig {
    op: Operator,
    stand_in: StandIn,
    storage: PathBuf,
}

impl Rig {
    /// Starts both in `ns`; reflectors store under `storage` (one folder for all: `shared`).
    async fn start(
        admin: &Client,
        ns: &str,
        identity: &str,
        storage: PathBuf,
        shared: bool,
        termination: Termination,
    ) -> Self {
        let stand_in = StandIn::start(admin, ns, storage.clone(), shared, termination);
        let report_port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let routing = RoutingArgs {
            report_listen: SocketAddr::from(([127, 0, 0, 1], report_port)),
            reflector_report_url: Some(format!("http://127.0.0.1:{report_port}")),
            report_secret: Some("refleet-report-key".to_owned()),
            ..RoutingArgs::loopback()
        };
        let op = Operator::start(
            admin.clone(),
            ns,
            identity,
            Duration::from_secs(6),
            Arc::new(HttpLoad::with_port(stand_in.port)),
            routing,
        )
        .await;
        Self {
            op,
            stand_in,
            storage,
        }
    }

    async fn stop(self) {
        self.op.stop().await;
        drop(self.stand_in);
        let _ = std::fs::remove_dir_all(&self.storage);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_reflectors_report_users_and_a_second_shard_opens_past_the_threshold() {
    let Some((_kube, kubeconfig)) = start_kube("fleet", 2) else {
        return;
    };
    let started = Instant::now();
    refleet_operator::controller::install_crypto_provider();
    let admin = admin_client(&kubeconfig).await;
    let ns = "refleet-fleet";
    prepare(&admin, ns).await;

    // Reflectors report to this operator, each with the credential in its pod.
    let rig = Rig::start(
        &admin,
        ns,
        "it-fleet",
        tempfile_dir(),
        false,
        Termination::Immediate,
    )
    .await;
    let (op, addrs) = (&rig.op, rig.stand_in.addrs.clone());

    let pools: Api<ReflectorPool> = Api::namespaced(admin.clone(), ns);
    pools
        .create(&PostParams::default(), &pool("arena"))
        .await
        .unwrap();
    let sessions: Api<Session> = Api::namespaced(admin.clone(), ns);
    let session: Session = serde_json::from_value(json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": "lobby"},
        "spec": {"poolRef": {"name": "arena"}, "appId": "app", "name": "lobby",
                 "maxUsersPerShard": 4, "scaleUpThreshold": 0.75}
    }))
    .unwrap();
    // Shard 0 is placed on a running reflector.
    let reflector = create_and_place(&sessions, &session).await;
    let addr = address_of(&addrs, &reflector).await;

    // Real clients join shard 0 until it reaches the threshold (0.75 × 4 = 3 users).
    let mut clients = Vec::new();
    for u in 0..3 {
        let ws = join(addr, "lobby-0", "app", "lobby", &format!("user-{u}")).await;
        clients.push(keep_reading(ws));
    }

    // The operator sees the users and opens shard `lobby~1`.
    let status = eventually("users and a second shard", Duration::from_secs(30), || {
        let sessions = sessions.clone();
        async move {
            let st = sessions.get("lobby").await.ok()?.status?;
            let zero = st.shards.iter().find(|s| s.name == "lobby")?;
            (zero.users == 3 && st.shards.iter().any(|s| s.name == "lobby~1")).then_some(st)
        }
    })
    .await;
    assert_eq!(status.users, 3, "{status:?}");
    assert_eq!(status.shard_count, 2, "{status:?}");
    let body = op.metrics_text().await.unwrap();
    assert!(
        body.contains(
            "refleet_operator_session_users{namespace=\"refleet-fleet\",session=\"lobby\"} 3"
        ),
        "{body}"
    );

    // Every reflector's report stream is open under its own identity; none was refused.
    let metrics = eventually(
        "every reflector's report stream",
        Duration::from_secs(30),
        || {
            let op = &op;
            let started_pods = addrs.lock().unwrap().len();
            async move {
                let text = op.metrics_text().await?;
                let streams: f64 = text
                    .lines()
                    .filter(|l| l.starts_with("refleet_report_streams{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum();
                (streams as usize == started_pods).then_some(text)
            }
        },
    )
    .await;
    let refusals: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("refleet_report_refusals_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(refusals.is_empty(), "{refusals:?}");

    for c in clients {
        c.abort();
    }
    rig.stop().await;
    eprintln!("fleet test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_moved_by_annotation_is_moving_then_lands_and_a_lost_host_is_replaced() {
    let Some((_kube, kubeconfig)) = start_kube("moves", 3) else {
        return;
    };
    let started = Instant::now();
    refleet_operator::controller::install_crypto_provider();
    let admin = admin_client(&kubeconfig).await;
    let ns = "refleet-moves";
    prepare(&admin, ns).await;
    let storage = tempfile_dir().join("moves");
    std::fs::create_dir_all(&storage).unwrap();
    let rig = Rig::start(
        &admin,
        ns,
        "it-moves",
        storage,
        true,
        Termination::Immediate,
    )
    .await;
    let (op, addrs) = (&rig.op, rig.stand_in.addrs.clone());
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);

    // Two reflectors kept ready, the gateway and moves on.
    let mut arena = moving_pool();
    arena.spec.defaults.min_reflectors = Some(2);
    arena.spec.defaults.max_reflectors = Some(3);
    let (sessions, source) = start_lobby(&admin, ns, &arena, 10).await;
    eventually("two reflectors reporting", Duration::from_secs(30), || {
        let op = &op;
        async move {
            let text = op.metrics_text().await?;
            text.lines()
                .any(|l| l == "refleet_report_streams{region=\"eu\"} 2")
                .then_some(())
        }
    })
    .await;
    let addr = addrs.lock().unwrap()[&source];
    let mut clients = Vec::new();
    for u in 0..2 {
        clients.push(join(addr, "lobby-0", "app", "lobby", &format!("user-{u}")).await);
    }

    // Asked by hand: the status shows the shard Moving, then on the other reflector. The
    // Moving status may last less than a poll, so every written version is read from a watch.
    let saw_moving: Arc<Mutex<Option<String>>> = Arc::default();
    let moving_watch = tokio::spawn(record_moving_to(
        sessions.clone(),
        "lobby",
        saw_moving.clone(),
    ));
    ask_move(&sessions, "lobby").await;
    let closes: Vec<_> = clients
        .into_iter()
        .map(|ws| tokio::spawn(closed_with(ws, 4003, Duration::from_secs(30))))
        .collect();
    let target = eventually(
        "the shard to land elsewhere",
        Duration::from_secs(40),
        || {
            let sessions = sessions.clone();
            let source = source.clone();
            async move {
                let st = sessions.get("lobby").await.ok()?.status?;
                let shard = st.shards.iter().find(|s| s.name == "lobby")?;
                (shard.reflector != source && shard.state != ShardPhase::Moving)
                    .then(|| (shard.reflector.clone(), st.handled_move_request.clone()))
            }
        },
    )
    .await;
    let (target, handled) = target;
    // The watch may still be delivering the versions written before the one read above.
    let saw_moving = eventually(
        "the watch to deliver Moving",
        Duration::from_secs(10),
        || {
            let saw = saw_moving.lock().unwrap().clone();
            async move { saw }
        },
    )
    .await;
    moving_watch.abort();
    let saw_moving = Some(saw_moving);
    assert_eq!(
        saw_moving.as_deref(),
        Some(target.as_str()),
        "status showed Moving with movingTo"
    );
    assert_eq!(
        handled.as_deref(),
        Some("lobby"),
        "the annotation is acted on once"
    );
    for c in closes {
        assert!(c.await.unwrap(), "the source closed its clients with 4003");
    }
    let moving = eventually("a ShardMoving Event", Duration::from_secs(20), || {
        let admin = admin.clone();
        async move {
            let notes = events_with_reason(&admin, ns, "ShardMoving").await;
            (!notes.is_empty()).then_some(notes)
        }
    })
    .await;
    assert!(
        moving[0].contains(&format!("from {source} to {target}")),
        "{moving:?}"
    );
    let text = op.metrics_text().await.unwrap();
    assert!(
        text.contains("refleet_router_moves_total{outcome=\"landed\"} 1"),
        "{text}"
    );

    // The target's pod disappears (node loss): the shard is placed again in its region.
    pods.delete(&target, &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let again = eventually("the shard placed again", Duration::from_secs(40), || {
        let sessions = sessions.clone();
        let target = target.clone();
        async move {
            let st = sessions.get("lobby").await.ok()?.status?;
            let shard = st.shards.iter().find(|s| s.name == "lobby")?;
            (!shard.reflector.is_empty() && shard.reflector != target)
                .then(|| shard.reflector.clone())
        }
    })
    .await;
    let reassigned = eventually("a ShardReassigned Event", Duration::from_secs(20), || {
        let admin = admin.clone();
        async move {
            let notes = events_with_reason(&admin, ns, "ShardReassigned").await;
            (!notes.is_empty()).then_some(notes)
        }
    })
    .await;
    assert!(reassigned[0].contains(&target), "{reassigned:?}");
    eprintln!(
        "moves test: placed again on {again}; took {:?}",
        started.elapsed()
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_image_roll_over_moves_live_shards_to_the_new_reflector() {
    let Some((_kube, kubeconfig)) = start_kube("rollover", 4) else {
        return;
    };
    refleet_operator::controller::install_crypto_provider();
    let admin = admin_client(&kubeconfig).await;
    let ns = "refleet-rollover";
    prepare(&admin, ns).await;
    let storage = tempfile_dir().join("rollover");
    std::fs::create_dir_all(&storage).unwrap();
    // Pods terminate as under a kubelet, and a draining reflector serves its sessions for
    // 30 s: the roll-over must not wait for that.
    Api::<k8s_openapi::api::core::v1::Node>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "standin"}})).unwrap(),
        )
        .await
        .unwrap();
    let rig = Rig::start(
        &admin,
        ns,
        "it-rollover",
        storage,
        true,
        Termination::Graceful {
            drain: Duration::from_secs(30),
        },
    )
    .await;
    let mut arena = moving_pool();
    arena.spec.defaults.max_reflectors = Some(2);
    arena.spec.drain_grace_period_seconds = 30;
    let (sessions, old) = start_lobby(&admin, ns, &arena, 10).await;
    let addr = address_of(&rig.stand_in.addrs, &old).await;
    let client = join(addr, "lobby-0", "app", "lobby", "user-0").await;
    let closed = tokio::spawn(closed_with(client, 4003, Duration::from_secs(60)));

    // A new image: the old reflector drains, and with moves on its live shard moves to the
    // new one instead of waiting out the drain.
    Api::<ReflectorPool>::namespaced(admin.clone(), ns)
        .patch(
            "arena",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"defaults": {"image": "refleet-reflector:it-2"}}})),
        )
        .await
        .unwrap();
    let new = eventually(
        "the shard on the new reflector",
        Duration::from_secs(60),
        || {
            let sessions = sessions.clone();
            let old = old.clone();
            async move {
                let st = sessions.get("lobby").await.ok()?.status?;
                let shard = st.shards.iter().find(|s| s.name == "lobby")?;
                (!shard.reflector.is_empty()
                    && shard.reflector != old
                    && shard.state != ShardPhase::Moving)
                    .then(|| shard.reflector.clone())
            }
        },
    )
    .await;
    assert!(
        closed.await.unwrap(),
        "the old reflector sent its client on with 4003"
    );
    let moving = events_with_reason(&admin, ns, "ShardMoving").await;
    assert!(
        moving
            .iter()
            .any(|n| n.contains(&format!("from {old} to {new}")) && n.contains("ReflectorDraining")),
        "{moving:?}"
    );
    rig.stop().await;
}

/// Instances race for Leases that do not exist yet: 12 Leases, two instances each, the second
/// starting 0, 3, 6, … 33 ms after the first, to cover the window between one instance
/// reading the Lease free and writing it. Taking a free Lease is a server-side apply without
/// force; with a field manager shared by all instances both applies succeeded and both led
/// until the next renewal (seen in the scale rig's smoke: two leaders for 10 s, reflectors
/// reporting to the one that then stepped down).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_racing_for_a_new_lease_never_lead_together() {
    use refleet_operator::controller::leader::{LeaseSettings, lead};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const LEASES: usize = 12;
    let Some((_kube, kubeconfig)) = start_kube("lease-race", 8) else {
        return;
    };
    refleet_operator::controller::install_crypto_provider();
    let admin = admin_client(&kubeconfig).await;
    let ns = "refleet-lease-race";
    prepare(&admin, ns).await;

    // Per Lease: how many lead now, the most that ever led at once, leaderships begun.
    let counts: Vec<[Arc<AtomicUsize>; 3]> = (0..LEASES)
        .map(|_| std::array::from_fn(|_| Arc::new(AtomicUsize::new(0))))
        .collect();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let start = Arc::new(tokio::sync::Barrier::new(LEASES * 2));
    let mut tasks = Vec::new();
    for (lease, [now, most, ever]) in counts.iter().enumerate() {
        for second in [false, true] {
            let (client, start) = (admin.clone(), start.clone());
            let (now, most, ever) = (now.clone(), most.clone(), ever.clone());
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let settings = LeaseSettings {
                    name: format!("race-{lease}"),
                    namespace: ns.into(),
                    identity: format!("racer-{lease}-{second}"),
                    duration: Duration::from_secs(4),
                    grace: Duration::from_secs(1),
                };
                start.wait().await;
                if second {
                    tokio::time::sleep(Duration::from_millis(3 * lease as u64)).await;
                }
                lead(
                    client,
                    settings,
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                    |_| {},
                    |lost| {
                        let (now, most, ever) = (now.clone(), most.clone(), ever.clone());
                        async move {
                            let leading = now.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(leading, Ordering::SeqCst);
                            ever.fetch_add(1, Ordering::SeqCst);
                            lost.await;
                            now.fetch_sub(1, Ordering::SeqCst);
                        }
                    },
                )
                .await
                .unwrap();
            }));
        }
    }
    // Past two renewals of whoever leads (the split lasted until the first).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let seen: Vec<[usize; 3]> = counts
        .iter()
        .map(|c| std::array::from_fn(|i| c[i].load(Ordering::SeqCst)))
        .collect();
    assert!(
        seen.iter()
            .all(|[now, most, ever]| (*now, *most, *ever) == (1, 1, 1)),
        "per Lease [leading now, most at once, leaderships]: {seen:?}"
    );
    let _ = stop_tx.send(true);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("every instance stops")
            .unwrap();
    }
}

/// A leader whose Lease another instance took over (as after a stall past its renewal)
/// stops leading within about a second, not at its own next renewal: with a 30 s Lease
/// renewed 5 s before it runs out, that would be 25 s of two leaders. While the Lease names
/// the other instance it does not lead again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_was_taken_over_stops_before_its_next_renewal() {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Patch, PatchParams};
    use refleet_operator::controller::leader::{LeaseSettings, lead};
    use std::sync::atomic::{AtomicBool, Ordering};

    let Some((_kube, kubeconfig)) = start_kube("lease-fence", 9) else {
        return;
    };
    refleet_operator::controller::install_crypto_provider();
    let admin = admin_client(&kubeconfig).await;
    let ns = "refleet-lease-fence";
    prepare(&admin, ns).await;
    let leading = Arc::new(AtomicBool::new(false));
    let stops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = {
        let (client, leading, stops) = (admin.clone(), leading.clone(), stops.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let settings = LeaseSettings {
                name: "fenced".into(),
                namespace: ns.into(),
                identity: "op-a".into(),
                duration: Duration::from_secs(30),
                grace: Duration::from_secs(5),
            };
            let flag = leading.clone();
            lead(
                client,
                settings,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
                move |now| {
                    flag.store(now, Ordering::SeqCst);
                    if !now {
                        stops.fetch_add(1, Ordering::SeqCst);
                    }
                },
                |lost| lost,
            )
            .await
            .unwrap();
        })
    };
    eventually("op-a to lead", Duration::from_secs(10), || {
        let leading = leading.clone();
        async move { leading.load(Ordering::SeqCst).then_some(()) }
    })
    .await;
    // The Lease runs out while still naming op-a, as after an apiserver outage longer than
    // its duration (nobody could take it meanwhile): op-a renews it at its next read and
    // leads on, instead of refusing Routes until the lease manager's own renewal.
    let leases: kube::Api<Lease> = kube::Api::namespaced(admin.clone(), ns);
    let long_ago =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(60);
    let ran_out = serde_json::json!({"spec": {
        "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(long_ago),
    }});
    leases
        .patch("fenced", &PatchParams::default(), &Patch::Merge(&ran_out))
        .await
        .unwrap();
    eventually(
        "op-a to renew the Lease that ran out",
        Duration::from_secs(3),
        || {
            let leases = leases.clone();
            async move {
                let renewed = leases.get("fenced").await.ok()?.spec?.renew_time?.0;
                (renewed > long_ago + k8s_openapi::jiff::SignedDuration::from_secs(30))
                    .then_some(())
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        (stops.load(Ordering::SeqCst), leading.load(Ordering::SeqCst)),
        (0, true),
        "op-a stopped leading over a Lease that ran out but named it"
    );
    // Another instance takes the Lease over (written as kube-lease-manager would).
    let now = k8s_openapi::jiff::Timestamp::now();
    let takeover = serde_json::json!({"spec": {
        "holderIdentity": "op-b",
        "acquireTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
        "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
        "leaseDuration": 30
    }});
    leases
        .patch("fenced", &PatchParams::default(), &Patch::Merge(&takeover))
        .await
        .unwrap();
    let taken = std::time::Instant::now();
    eventually("op-a to stop leading", Duration::from_secs(3), || {
        let leading = leading.clone();
        async move { (!leading.load(Ordering::SeqCst)).then_some(()) }
    })
    .await;
    assert!(
        taken.elapsed() < Duration::from_secs(3),
        "stopped {:?} after the takeover",
        taken.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !leading.load(Ordering::SeqCst),
        "led again while the Lease names op-b"
    );
    let _ = stop_tx.send(true);
    tokio::time::timeout(Duration::from_secs(40), task)
        .await
        .expect("the instance stops")
        .unwrap();
}
