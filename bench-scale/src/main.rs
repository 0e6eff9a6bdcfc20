//! `refleet-scale-bench`: the operator and router at scale, on a real kube-apiserver whose
//! nodes are kwok's and whose reflectors and users are simulated (see docs/scale.md and
//! `bench/scale/run`, which starts the apiserver, kwok and this).

mod cluster;
mod fleet;
mod ops;
mod users;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use refleet_bench::procstat::Proc;
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Drives the real `refleet operator` (two replicas, leader election) against a real
/// kube-apiserver with kwok nodes: simulated reflectors (one real report stream per reflector
/// pod, with its pod's credential) and simulated users calling Route over gRPC.
///
/// Writes a JSON summary (`--out`/summary.json) and exits non-zero when a shard went over its
/// hard cap, a join token failed to verify, a user was refused for lack of room more than
/// once (refusals at a Session's own `maxShards` are counted apart, in
/// `refused_at_max_shards`), or (with --strict) any Route failed outside the injected
/// failures.
#[derive(Debug, Parser)]
// Later flags win, so `bench/scale/run --smoke -- --duration 15s` overrides the smoke's own.
#[command(name = "refleet-scale-bench", version, args_override_self = true)]
struct Args {
    /// Admin kubeconfig of the apiserver (scripts/kube-local/start.sh prints one).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Kubeconfig the operators run with (the chart's ServiceAccount; default: --kubeconfig).
    #[arg(long)]
    operator_kubeconfig: Option<PathBuf>,
    /// The `refleet` binary whose `operator` subcommand is measured.
    #[arg(long, default_value = "target/release/refleet")]
    refleet: PathBuf,
    /// Operator replicas on one Lease.
    #[arg(long, default_value_t = 2)]
    replicas: usize,
    /// The operators' Lease duration.
    #[arg(long, default_value = "15s")]
    lease_duration: String,
    /// The operators' --token-ttl. A new leader counts the shards it did not open as full
    /// for this long (its post-failover warm-up), so the measured phase starts after it.
    #[arg(long, default_value = "60s")]
    token_ttl: humantime::Duration,
    /// Namespace of the pool and Sessions.
    #[arg(long, default_value = "refleet-scale")]
    namespace: String,
    /// Namespace of the operators (Lease, join-token and report-key Secrets).
    #[arg(long, default_value = "refleet-system")]
    lease_namespace: String,
    /// Directory for logs and summary.json.
    #[arg(long, default_value = "target/scale")]
    out: PathBuf,
    /// The apiserver's audit log, to count the operator's requests by user agent and verb.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// The operators' user name in the audit log.
    #[arg(
        long,
        default_value = "system:serviceaccount:refleet-system:refleet-operator"
    )]
    operator_user: String,

    /// kwok nodes, spread evenly over the regions.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Regions (`region-0` …), one node label value and one pool region each.
    #[arg(long, default_value_t = 10)]
    regions: usize,
    /// What one reflector carries: shards.
    #[arg(long, default_value_t = 200)]
    reflector_sessions: u32,
    /// What one reflector carries: users.
    #[arg(long, default_value_t = 2000)]
    reflector_users: u32,
    /// Reflectors each region keeps at least.
    #[arg(long, default_value_t = 2)]
    min_reflectors: u32,
    /// Reflectors each region may have.
    #[arg(long, default_value_t = 500)]
    max_reflectors: u32,
    /// Empty ready reflectors kept per region for bursts.
    #[arg(long, default_value_t = 1)]
    warm_buffer: u32,
    /// The pool's `growthBufferSeconds`: also keep as many empty reflectors per region as its
    /// demand grew by over this many seconds (0: off).
    #[arg(long, default_value_t = 0)]
    growth_buffer_seconds: u32,
    /// `maxUsersPerShard` of the rooms (long tail) Session.
    #[arg(long, default_value_t = 50)]
    room_cap: u32,
    /// `maxShards` of the rooms Session (each room may open this many shards; a room at
    /// it refuses, counted apart in `refused_at_max_shards`).
    #[arg(long, default_value_t = 20)]
    room_max_shards: u32,
    /// `maxUsersPerShard` of the arena Sessions.
    #[arg(long, default_value_t = 1000)]
    arena_cap: u32,
    /// `maxShards` of the arena Sessions.
    #[arg(long, default_value_t = 100)]
    arena_max_shards: u32,
    /// `scaleUpThreshold` of every Session.
    #[arg(long, default_value_t = 0.8)]
    threshold: f64,

    /// Concurrent users aimed at.
    #[arg(long, default_value_t = 10_000)]
    users: u64,
    /// Mean stay of a user (exponential).
    #[arg(long, default_value = "60s")]
    stay: humantime::Duration,
    /// Arrivals run fast enough to reach --users within this.
    #[arg(long, default_value = "30s")]
    ramp: humantime::Duration,
    /// Length of the compressed day of the diurnal curve.
    #[arg(long, default_value = "300s")]
    day: humantime::Duration,
    /// Diurnal amplitude (0: flat; 0.5: each region swings ±50 %).
    #[arg(long, default_value_t = 0.5)]
    diurnal_amplitude: f64,
    /// Distinct small sessions (`room-<n>`, Zipf-distributed).
    #[arg(long, default_value_t = 5000)]
    rooms: usize,
    /// Zipf exponent of the room popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Big sessions (`arena-<k>`).
    #[arg(long, default_value_t = 3)]
    arenas: usize,
    /// Share of arrivals going to the arenas.
    #[arg(long, default_value_t = 0.3)]
    arena_share: f64,
    /// Share of users who never join with their token (their reservation expires).
    #[arg(long, default_value_t = 0.02)]
    abandon: f64,
    /// When the flash crowd into `arena-0` starts (after the measured phase began).
    #[arg(long)]
    flash_at: Option<humantime::Duration>,
    /// Users in the flash crowd.
    #[arg(long, default_value_t = 2000)]
    flash_users: u64,
    /// Over how long the flash crowd arrives.
    #[arg(long, default_value = "5s")]
    flash_over: humantime::Duration,
    /// Seed of the user model.
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// Length of the measured phase.
    #[arg(long, default_value = "180s")]
    duration: humantime::Duration,
    /// How long to wait for the initial fleet (min reflectors of every region streaming).
    #[arg(long, default_value = "300s")]
    settle_timeout: humantime::Duration,

    /// Kill (SIGKILL) the leading operator at this time (e.g. during the flash crowd).
    #[arg(long)]
    kill_leader_at: Option<humantime::Duration>,
    /// Take --down-region's nodes NotReady at this time.
    #[arg(long)]
    region_down_at: Option<humantime::Duration>,
    /// The region whose nodes go NotReady (default: the last).
    #[arg(long)]
    down_region: Option<String>,
    /// Restart the apiserver at this time, with --apiserver-restart-cmd.
    #[arg(long)]
    apiserver_restart_at: Option<humantime::Duration>,
    /// Shell command that restarts the apiserver (bench/scale/run passes one).
    #[arg(long)]
    apiserver_restart_cmd: Option<String>,
    /// After the measured phase: Route at this rate (calls/s) on session `lookup` against
    /// the leader for --probe-duration (0: no probe).
    #[arg(long, default_value_t = 0)]
    probe_rate: u64,
    /// Length of the Route throughput probe.
    #[arg(long, default_value = "10s")]
    probe_duration: humantime::Duration,
    /// User ids the probe cycles through (each gets its pending reservation back).
    #[arg(long, default_value_t = 500)]
    probe_users: u64,
    /// HTTP/2 connections the users' Routes go over to each operator, round-robin (as from
    /// this many app backends); the probe uses one.
    #[arg(long, default_value_t = 16)]
    route_connections: usize,
    /// Fail when any Route failed or any user gave up (outside injected failures, use with
    /// none injected).
    #[arg(long)]
    strict: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Tick {
    t_s: f64,
    active_users: i64,
    reflectors: u64,
    streams_open: u64,
    routes_ok: u64,
    routes_failed: u64,
    leader: String,
    leader_cores: f64,
    leader_rss_mib: f64,
    users_by_region: std::collections::BTreeMap<String, u64>,
    /// The pool status' growth buffer summed over its regions (`growthBufferSeconds`).
    growth_buffer: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Events {
    leader_killed_at_s: Option<f64>,
    killed: Option<String>,
    new_leader: Option<String>,
    new_leader_after_s: Option<f64>,
    first_route_after_kill_s: Option<f64>,
    streams_back_after_s: Option<f64>,
    region_down_at_s: Option<f64>,
    region_down: Option<String>,
    region_down_nodes: usize,
    region_down_reflectors_cut: usize,
    routes_from_down_region_after: std::collections::BTreeMap<String, u64>,
    apiserver_restart_at_s: Option<f64>,
    apiserver_restart_took_s: Option<f64>,
    apiserver_restart_ok: Option<bool>,
}

async fn admin_client(path: &PathBuf) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    // Thousands of binds and status reads at start-up: the default 30 s read timeout stays.
    config.connect_timeout = Some(Duration::from_secs(5));
    Ok(Client::try_from(config)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    // kube's rustls needs a process-wide crypto provider: ring, as the operator's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let code = run(args).await?;
    std::process::exit(code);
}

#[allow(clippy::too_many_lines)]
async fn run(args: Args) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&args.out)?;
    let client = admin_client(&args.kubeconfig).await?;
    let shape = cluster::Shape {
        nodes: args.nodes,
        regions: args.regions,
        reflector_sessions: args.reflector_sessions,
        reflector_users: args.reflector_users,
        min_reflectors: args.min_reflectors,
        max_reflectors: args.max_reflectors,
        warm_buffer: args.warm_buffer,
        growth_buffer_seconds: args.growth_buffer_seconds,
        room_cap: args.room_cap,
        room_max_shards: args.room_max_shards,
        arenas: args.arenas,
        arena_cap: args.arena_cap,
        arena_max_shards: args.arena_max_shards,
        threshold: args.threshold,
    };
    let setup_started = Instant::now();
    for ns in [&args.namespace, &args.lease_namespace] {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        match Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &obj)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e).context("creating namespace"),
        }
    }
    let keys = args.out.join("api-keys");
    std::fs::create_dir_all(&keys)?;
    for app in [cluster::ROOMS_APP, cluster::ARENA_APP] {
        std::fs::write(keys.join(app), format!("{}\n", users::api_key(app)))?;
    }

    cluster::create_nodes(&client, &shape).await?;
    let nodes_ready = loop {
        let ready = cluster::ready_nodes(&client).await?;
        let n: usize = ready.values().map(Vec::len).sum();
        if n >= args.nodes {
            break ready;
        }
        anyhow::ensure!(
            setup_started.elapsed() < *args.settle_timeout,
            "only {n} of {} nodes Ready (is kwok running?)",
            args.nodes
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let nodes_ready_s = setup_started.elapsed().as_secs_f64();
    tracing::info!(secs = nodes_ready_s, "every node Ready (kwok)");

    let mut operators = Vec::new();
    let settings = ops::OperatorSettings {
        bin: args.refleet.clone(),
        kubeconfig: args
            .operator_kubeconfig
            .clone()
            .unwrap_or_else(|| args.kubeconfig.clone()),
        namespace: args.namespace.clone(),
        lease_namespace: args.lease_namespace.clone(),
        api_keys_dir: keys.clone(),
        lease_duration: args.lease_duration.clone(),
        token_ttl: args.token_ttl.to_string(),
        out: args.out.clone(),
    };
    for i in 0..args.replicas {
        let mut op = ops::Operator::new(&settings, i)?;
        op.start()?;
        operators.push(op);
    }
    let leader_at = loop {
        let mut any = false;
        for o in &operators {
            any |= o.is_leader().await;
        }
        if any {
            break Instant::now();
        }
        anyhow::ensure!(
            setup_started.elapsed() < *args.settle_timeout,
            "no operator became leader; see {}",
            operators[0].log_path().display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let fleet = fleet::Fleet::new(
        operators
            .iter()
            .map(|o| format!("http://{}", o.report))
            .collect(),
    );
    let binder = Arc::new(cluster::Binder::default());
    binder.set_nodes(nodes_ready);
    let capacity = refleet_api::report::Capacity {
        max_sessions: args.reflector_sessions,
        max_users: args.reflector_users,
    };
    tokio::spawn(cluster::watch_pods(
        client.clone(),
        args.namespace.clone(),
        fleet.clone(),
        binder.clone(),
        capacity,
    ));
    cluster::apply(&client, &args.namespace, &cluster::pool(&shape)).await?;
    for s in cluster::sessions(&shape) {
        cluster::apply(&client, &args.namespace, &s).await?;
    }

    // The initial fleet: every region's minimum streaming to the leader.
    let want = u64::from(args.min_reflectors) * args.regions as u64;
    loop {
        let open = fleet.stats.streams_open.load(Ordering::Relaxed);
        if open >= want {
            break;
        }
        if setup_started.elapsed() > *args.settle_timeout {
            anyhow::bail!(
                "only {open} of {want} reflectors streaming after {:?}; see {}",
                *args.settle_timeout,
                operators[0].log_path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fleet_ready_s = setup_started.elapsed().as_secs_f64();
    tracing::info!(
        secs = fleet_ready_s,
        reflectors = fleet.count(),
        "initial fleet streaming"
    );

    // Past the new leader's warm-up, so the measured phase is its steady state.
    let warm = leader_at + *args.token_ttl + Duration::from_secs(1);
    if Instant::now() < warm {
        tracing::info!(wait = ?(warm - Instant::now()), "waiting out the leader's warm-up (--token-ttl)");
        tokio::time::sleep_until(warm).await;
    }
    let model = Arc::new(users::Model {
        namespace: args.namespace.clone(),
        regions: args.regions,
        users: args.users,
        stay: *args.stay,
        ramp: *args.ramp,
        day: *args.day,
        diurnal_amplitude: args.diurnal_amplitude,
        rooms: args.rooms,
        zipf: args.zipf,
        arenas: args.arenas,
        arena_share: args.arena_share,
        abandon: args.abandon,
        flash_at: args.flash_at.map(Into::into),
        flash_users: args.flash_users,
        flash_over: *args.flash_over,
        seed: args.seed,
    });
    let router = Arc::new(users::Router::new(
        &operators
            .iter()
            .map(|o| format!("http://{}", o.router))
            .collect::<Vec<_>>(),
        args.route_connections,
    )?);
    let stats = Arc::new(users::UserStats::default());

    let apiserver_before = apiserver_metrics(&client).await.unwrap_or_default();
    let wall_from = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let started = Instant::now();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(users::run_arrivals(
        model.clone(),
        router.clone(),
        fleet.clone(),
        stats.clone(),
        started,
        stop_rx,
    ));

    let operators = Arc::new(tokio::sync::Mutex::new(operators));
    let events = Arc::new(std::sync::Mutex::new(Events::default()));
    if let Some(at) = args.kill_leader_at {
        let (operators, events, stats, fleet) = (
            operators.clone(),
            events.clone(),
            stats.clone(),
            fleet.clone(),
        );
        let at: Duration = at.into();
        tokio::spawn(async move {
            tokio::time::sleep_until(started + at).await;
            kill_leader(&operators, &events, &stats, &fleet, started).await;
        });
    }
    if let Some(at) = args.region_down_at {
        let (client, events, fleet, binder, stats) = (
            client.clone(),
            events.clone(),
            fleet.clone(),
            binder.clone(),
            stats.clone(),
        );
        let ns = args.namespace.clone();
        let region = args
            .down_region
            .clone()
            .unwrap_or_else(|| cluster::region(args.regions - 1));
        let at: Duration = at.into();
        tokio::spawn(async move {
            tokio::time::sleep_until(started + at).await;
            tracing::warn!(%region, "taking the region's nodes NotReady");
            stats.disturbed();
            fleet::lock(&binder.down).push(region.clone());
            fleet::lock(&stats.regions).clear();
            let nodes = cluster::region_down(&client, &ns, &region).await;
            let cut = fleet.cut_region(&region);
            let mut e = fleet::lock(&events);
            e.region_down_at_s = Some(started.elapsed().as_secs_f64());
            e.region_down = Some(region);
            e.region_down_nodes = nodes.unwrap_or_default();
            e.region_down_reflectors_cut = cut;
        });
    }
    let mut restarting = None;
    if let (Some(at), Some(cmd)) = (
        args.apiserver_restart_at,
        args.apiserver_restart_cmd.clone(),
    ) {
        let (events, stats) = (events.clone(), stats.clone());
        let at: Duration = at.into();
        restarting = Some(tokio::spawn(async move {
            tokio::time::sleep_until(started + at).await;
            tracing::warn!(%cmd, "restarting the apiserver");
            stats.disturbed();
            let t0 = Instant::now();
            let ok = tokio::process::Command::new("sh")
                .args(["-c", &cmd])
                .status()
                .await
                .is_ok_and(|s| s.success());
            let mut e = fleet::lock(&events);
            e.apiserver_restart_at_s = Some((t0 - started).as_secs_f64());
            e.apiserver_restart_took_s = Some(t0.elapsed().as_secs_f64());
            e.apiserver_restart_ok = Some(ok);
        }));
    }

    // Sample the leader every 5 s until the end.
    let mut timeline: Vec<Tick> = Vec::new();
    let mut prev: Option<(String, refleet_bench::procstat::Sample)> = None;
    let mut cores: Vec<f64> = Vec::new();
    let mut rss_max_kib = 0u64;
    let end = started + *args.duration;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(5).min(end - Instant::now())).await;
        let (leader, pid) = {
            let ops = operators.lock().await;
            let mut found = (String::new(), None);
            for o in ops.iter() {
                if o.is_leader().await {
                    found = (o.identity.clone(), o.pid());
                }
            }
            found
        };
        let sample = pid.and_then(|p| Proc::Pid(p).sample());
        let mut c = 0.0;
        let mut rss = 0.0;
        if let Some(s) = sample {
            if let Some((who, p)) = &prev
                && *who == leader
            {
                c = refleet_bench::procstat::Usage::between(p, &s).cores;
                cores.push(c);
            }
            rss = s.rss_kib as f64 / 1024.0;
            rss_max_kib = rss_max_kib.max(s.rss_kib);
            prev = Some((leader.clone(), s));
        }
        let f = fleet.snapshot();
        let tick = Tick {
            t_s: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            active_users: stats.active.load(Ordering::Relaxed),
            reflectors: f.reflectors,
            streams_open: f.streams_open,
            routes_ok: stats.routes_ok.load(Ordering::Relaxed),
            routes_failed: stats.routes_failed.load(Ordering::Relaxed),
            leader,
            leader_cores: (c * 100.0).round() / 100.0,
            leader_rss_mib: rss.round(),
            users_by_region: fleet.users_by_region().into_iter().collect(),
            growth_buffer: cluster::pool_growth_buffer(&client, &args.namespace).await,
        };
        tracing::info!(
            t = tick.t_s,
            users = tick.active_users,
            reflectors = tick.reflectors,
            streams = tick.streams_open,
            routes = tick.routes_ok,
            failed = tick.routes_failed,
            leader = %tick.leader,
            cores = tick.leader_cores,
            rss_mib = tick.leader_rss_mib,
            "tick"
        );
        timeline.push(tick);
    }
    let _ = stop_tx.send(true);
    let measured_s = started.elapsed().as_secs_f64();
    // A restart still under way is waited for: its figure belongs to the run, and a helper
    // that outlived the run would start an apiserver after the clean-up.
    if let Some(restart) = restarting
        && tokio::time::timeout(Duration::from_secs(120), restart)
            .await
            .is_err()
    {
        tracing::warn!("the apiserver restart had not finished 120 s after the run");
    }
    let wall_to = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();

    let probe = if args.probe_rate > 0 {
        let p = users::probe(
            router.clone(),
            args.namespace.clone(),
            args.probe_rate,
            *args.probe_duration,
            args.probe_users,
        )
        .await;
        tracing::info!(?p, "Route throughput probe");
        Some(p)
    } else {
        None
    };

    // Final readings.
    let apiserver_after = apiserver_metrics(&client).await.unwrap_or_default();
    let apiserver_rate = apiserver_before.rate(&apiserver_after, measured_s);
    let leader_metrics = {
        let ops = operators.lock().await;
        let mut text = None;
        for o in ops.iter() {
            if o.is_leader().await {
                text = o.metrics_text().await;
            }
        }
        text.unwrap_or_default()
    };
    let audit = match &args.audit_log {
        Some(p) => ops::audit_counts(p, &args.operator_user, &wall_from, &wall_to)
            .map(|counts| {
                counts
                    .into_iter()
                    .map(|(k, v)| (k, (v as f64 / measured_s * 100.0).round() / 100.0))
                    .collect::<std::collections::BTreeMap<_, _>>()
            })
            .map_err(|e| tracing::warn!(error = %e, "audit log not read"))
            .ok(),
        None => None,
    };
    let m = |name: &str| ops::metric(&leader_metrics, name, &[]).unwrap_or(0.0);
    let q = |name: &str, quant: f64| {
        ops::histogram_quantile(&leader_metrics, name, quant).map(|v| (v * 1e4).round() / 10.0)
    };
    let fleet_snap = fleet.snapshot();
    let user = stats.summary(started);
    let mut steady: Vec<f64> = cores.clone();
    steady.sort_by(f64::total_cmp);
    let mean_cores = if cores.is_empty() {
        0.0
    } else {
        cores.iter().sum::<f64>() / cores.len() as f64
    };
    let mut biggest = fleet.shard_sizes();
    biggest.sort_by_key(|s| std::cmp::Reverse(s.2));
    biggest.truncate(5);
    // The arenas' shards as the router lists them: users, pending reservations, caps.
    let mut arena_shards = Vec::new();
    for k in 0..args.arenas {
        let session = format!("arena-{k}");
        for s in router
            .list_shards(&args.namespace, &session)
            .await
            .unwrap_or_default()
        {
            arena_shards.push(json!({
                "shard": s.shard, "region": s.region, "reflector": s.reflector, "users": s.users,
                "reserved": s.reserved, "max_users": s.max_users, "threshold": s.threshold_users,
                "state": s.state,
            }));
        }
    }
    // The waiting Routes' retries by cause (`refleet_router_route_retries_total`).
    let retries: std::collections::BTreeMap<_, _> = ["session", "fleet", "tick"]
        .map(|cause| {
            let n = ops::metric(
                &leader_metrics,
                "refleet_router_route_retries_total",
                &[("cause", cause)],
            );
            (cause, n.unwrap_or(0.0))
        })
        .into_iter()
        .collect();
    let summary = json!({
        "arena_shards": arena_shards,
        "route_probe": probe,
        "args": format!("{args:?}"),
        "setup": {"nodes_ready_s": nodes_ready_s, "initial_fleet_streaming_s": fleet_ready_s,
                  "pods_bound": binder.bound.load(Ordering::Relaxed)},
        "measured_s": measured_s,
        "users": user,
        "fleet": fleet_snap,
        "biggest_shards_now": biggest,
        "leader": {
            "cores_mean": (mean_cores * 100.0).round() / 100.0,
            "cores_max_5s": steady.last().copied().unwrap_or(0.0),
            "rss_max_mib": rss_max_kib / 1024,
        },
        "operator_metrics": {
            "reconciles_total": m("refleet_operator_reconciles_total"),
            "syncs_coalesced_total": m("refleet_operator_syncs_coalesced_total"),
            "reconcile_errors_total": m("refleet_operator_reconcile_errors_total"),
            "reconcile_p50_ms": q("refleet_operator_reconcile_duration_seconds", 0.5),
            "reconcile_p99_ms": q("refleet_operator_reconcile_duration_seconds", 0.99),
            "route_p99_ms_server": q("refleet_router_request_duration_seconds", 0.99),
            "shards": m("refleet_operator_shards"),
            "reflectors": m("refleet_operator_reflectors"),
            "shards_over_cap": m("refleet_operator_shards_over_cap"),
            "router_shard_opens_total": m("refleet_router_shard_opens_total"),
            "reservations_now": m("refleet_router_reservations"),
            "waiting_routes_now": m("refleet_router_waiting_routes"),
            "route_retries_total": retries,
            "report_streams": m("refleet_report_streams"),
            "report_refusals_total": m("refleet_report_refusals_total"),
        },
        "apiserver_requests_per_s_all_clients": apiserver_rate,
        "operator_requests_per_s_audit": audit,
        "events": *fleet::lock(&events),
        "routes_by_region": fleet::lock(&stats.regions).iter()
            .map(|((from, to), n)| (format!("{from}->{to}"), *n))
            .collect::<std::collections::BTreeMap<_, _>>(),
        "timeline": timeline,
    });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "users": summary["users"], "fleet": summary["fleet"], "leader": summary["leader"],
            "operator_metrics": summary["operator_metrics"], "events": summary["events"],
            "setup": summary["setup"], "route_probe": summary["route_probe"], "operator_requests_per_s_audit": summary["operator_requests_per_s_audit"],
            "apiserver_requests_per_s_all_clients": summary["apiserver_requests_per_s_all_clients"]["by_verb"],
        }))?
    );
    println!("summary: {}", path.display());

    let mut failures = Vec::new();
    if fleet_snap.shards_over_cap > 0 {
        failures.push(format!(
            "{} shards went over their hard cap",
            fleet_snap.shards_over_cap
        ));
    }
    if fleet_snap.bad_tokens > 0 {
        failures.push(format!(
            "{} join tokens did not verify",
            fleet_snap.bad_tokens
        ));
    }
    if user.routes_ok == 0 {
        failures.push("no Route succeeded".into());
    }
    // The growth buffer end to end: planner, pool status through the apiserver.
    let growth_max = timeline.iter().filter_map(|t| t.growth_buffer).max();
    if args.growth_buffer_seconds > 0 && growth_max.unwrap_or(0) == 0 {
        failures.push(format!(
            "--growth-buffer-seconds {} but the pool status never showed a growth buffer ({growth_max:?})",
            args.growth_buffer_seconds
        ));
    }
    if user.refused_more_than_once > 0 {
        failures.push(format!(
            "{} users were refused (no room) more than once, up to {} times",
            user.refused_more_than_once, user.most_refusals
        ));
    }
    if args.strict && (user.routes_failed > 0 || user.gave_up > 0) {
        failures.push(format!(
            "{} Routes failed ({:?}), {} users gave up",
            user.routes_failed, user.errors, user.gave_up
        ));
    }
    if m("refleet_operator_reconcile_errors_total") > 0.0 && args.strict {
        failures.push("the leader counted reconcile errors".into());
    }
    let mut ops = operators.lock().await;
    for o in ops.iter_mut() {
        // A replica that died on its own leaves no standby: its figures would not be the run's.
        if let Some(status) = o.exited() {
            failures.push(format!(
                "{} exited on its own ({status}); see its log",
                o.identity
            ));
        }
        o.kill().await;
    }
    if failures.is_empty() {
        println!("refleet-scale-bench: passed");
        Ok(0)
    } else {
        for f in &failures {
            eprintln!("refleet-scale-bench: FAILED: {f}");
        }
        Ok(1)
    }
}

async fn apiserver_metrics(client: &Client) -> anyhow::Result<ops::ApiserverRequests> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    Ok(ops::apiserver_requests(&text))
}

async fn kill_leader(
    operators: &tokio::sync::Mutex<Vec<ops::Operator>>,
    events: &std::sync::Mutex<Events>,
    stats: &users::UserStats,
    fleet: &fleet::Fleet,
    started: Instant,
) {
    let ops = operators.lock().await;
    let mut leader = None;
    for (i, o) in ops.iter().enumerate() {
        if o.is_leader().await {
            leader = Some(i);
        }
    }
    let Some(i) = leader else {
        tracing::warn!("no leader to kill");
        return;
    };
    drop(ops);
    // The kill only tests a failover if a standby is there to take over.
    let mut ops = operators.lock().await;
    for o in ops.iter_mut() {
        if let Some(status) = o.exited() {
            tracing::error!(operator = %o.identity, %status, "a replica exited on its own before the kill: no standby");
        }
    }
    drop(ops);
    // The lock is held only briefly from here on: the sampler reads the operators too.
    let mut ops = operators.lock().await;
    stats.disturbed();
    ops[i].kill().await;
    let killed_at = Instant::now();
    tracing::warn!(killed = %ops[i].identity, "leader killed (SIGKILL)");
    {
        let mut e = fleet::lock(events);
        e.leader_killed_at_s = Some((killed_at - started).as_secs_f64());
        e.killed = Some(ops[i].identity.clone());
    }
    drop(ops);
    let deadline = killed_at + Duration::from_secs(60);
    let mut new_leader = None;
    let mut first_route = None;
    let mut streams_back = None;
    while Instant::now() < deadline
        && (new_leader.is_none() || first_route.is_none() || streams_back.is_none())
    {
        if new_leader.is_none() {
            let ops = operators.lock().await;
            for o in ops.iter() {
                if o.pid().is_some() && o.is_leader().await {
                    new_leader = Some((o.identity.clone(), killed_at.elapsed()));
                }
            }
        }
        if first_route.is_none() && fleet::lock(&stats.last_ok).is_some_and(|t| t > killed_at) {
            first_route = Some(killed_at.elapsed());
        }
        // Every reflector that still exists streams again (the new leader may have removed
        // some meanwhile: counting against the number before the kill waited for new ones).
        if streams_back.is_none()
            && new_leader.is_some()
            && fleet.stats.streams_open.load(Ordering::Relaxed) >= fleet.count() as u64
        {
            streams_back = Some(killed_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let mut e = fleet::lock(events);
        e.new_leader = new_leader.as_ref().map(|l| l.0.clone());
        e.new_leader_after_s = new_leader.map(|l| l.1.as_secs_f64());
        e.first_route_after_kill_s = first_route.map(|d| d.as_secs_f64());
        e.streams_back_after_s = streams_back.map(|d| d.as_secs_f64());
    }
    // The killed replica comes back as the standby (as its pod would be restarted).
    if let Err(error) = operators.lock().await[i].start() {
        tracing::warn!(%error, "restarting the killed operator failed");
    }
}
