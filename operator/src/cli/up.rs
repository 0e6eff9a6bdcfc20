//! `refleet up`: a whole fleet on one machine.
//!
//! Reads the config (or the embedded default), serves the fleet view (`/`), `/files/`,
//! `/v1/status` and the router
//! (Route and ListShards over gRPC, gRPC-Web and JSON `/v1/route`, `/v1/shards`; the
//! reflectors' report stream and the gateways' placement watch on a loopback port of its own;
//! one gateway per region of a pool with `gateway.enabled`, each on a port of its own), and
//! runs the local backend's observe → plan → act loop until Ctrl-C or
//! SIGTERM, which drains every reflector, waits for them to exit and returns.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::gateway::metrics::GatewayMetrics;
use crate::gateway::{Gateway, GatewayConfig, Placements, RouterTable};
use crate::local::config::{LocalConfig, LocalSettings};
use crate::local::fleet::{Fleet, PoolRuntime};
use crate::local::launcher::{ProcessLauncher, ProcessSettings, sessions_client};
use crate::local::server::{Published, Server};
use crate::local::table;
use crate::router::metrics::RouterMetrics;
use crate::router::placement_watch::GATEWAY_IDENTITY;
use crate::router::reports::{self, ReportHub};
use crate::router::service::{self, Access, Frontend, always_leading};
use crate::router::{Router, RouterConfig};
use refleet_api::reflector::launch::LaunchSpec;
use refleet_api::report_credential::ReportKey;
use refleet_api::token::{Signer, Verifier};

/// Arguments of `refleet up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Fleet config: a YAML stream of ReflectorPool, Session and LocalFleet documents
    /// (see examples/local-fleet.yaml). Default: the embedded copy of that example.
    #[arg(long, value_name = "FILE", env = "REFLEET_UP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of refleet up's own server (overrides the config's `listen`).
    #[arg(long, env = "REFLEET_UP_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory (overrides the config's `dataDir`).
    #[arg(long, value_name = "DIR", env = "REFLEET_UP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The refleet-reflector binary (overrides the config's `reflectorBinary`). Default: next
    /// to this binary, else on PATH.
    #[arg(long, value_name = "FILE", env = "REFLEET_REFLECTOR_BIN")]
    pub reflector_bin: Option<PathBuf>,
    /// Log lines as JSON objects instead of text (filter with RUST_LOG).
    #[arg(long, env = "REFLEET_UP_LOG_JSON")]
    pub log_json: bool,
    /// Serve the files of this directory at `/demo/` (read-only; no listing): a browser demo
    /// next to the fleet, same origin as `/v1/route` and `/files/`. See
    /// examples/browser-demo/README.md for what to put in it.
    #[arg(long, value_name = "DIR", env = "REFLEET_UP_DEMO")]
    pub demo: Option<PathBuf>,
    /// Print a Prometheus configuration that scrapes this fleet (HTTP service discovery from
    /// `/v1/prometheus/targets`, job names as in a cluster) and exit. Needs a fixed port.
    #[arg(long)]
    pub print_scrape_config: bool,
}

/// Runs the local fleet until Ctrl-C or SIGTERM.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let UpArgs {
        config,
        listen,
        data_dir,
        reflector_bin,
        log_json,
        demo,
        print_scrape_config,
    } = args;
    init_tracing(log_json);
    let config = match &config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            LocalConfig::parse(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => LocalConfig::embedded().context("in the embedded default config")?,
    };
    let LocalConfig {
        settings,
        pools,
        sessions,
    } = config;
    let LocalSettings {
        listen: config_listen,
        data_dir: config_data_dir,
        reflector_binary,
        reflector_host,
        report_interval_millis,
        reflector_args,
        child_logs,
        max_upload_bytes,
        join_tokens,
        token_ttl_seconds,
        reservations_per_client,
        anonymous_reservation_share,
    } = settings;
    if print_scrape_config {
        print_flush(&crate::local::prometheus::scrape_config(
            listen.unwrap_or(config_listen),
        )?);
        return Ok(());
    }
    let data_dir = absolute(&data_dir.unwrap_or(config_data_dir))?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    let binary = reflector_bin
        .or(reflector_binary)
        .unwrap_or_else(default_reflector_binary);

    let listen = listen.unwrap_or(config_listen);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let base = format!("http://{bound}/");
    let default_storage = data_dir.join("storage").display().to_string();
    let runtimes: Vec<PoolRuntime> = pools
        .into_iter()
        .map(|pool| PoolRuntime {
            storage: pool
                .spec
                .storage
                .as_ref()
                .map_or_else(|| default_storage.clone(), |s| s.url.clone()),
            files_url: pool
                .files_url
                .clone()
                .unwrap_or_else(|| format!("{base}files")),
            pool,
        })
        .collect();
    // refleet up serves the files of the first pool's storage (see operator/README.md).
    let storage_location = runtimes
        .first()
        .map_or_else(|| default_storage.clone(), |p| p.storage.clone());
    let storage = refleet_files::storage::Storage::open(&storage_location)
        .with_context(|| format!("opening storage {storage_location}"))?;
    let shutdown_timeout = Duration::from_secs(
        runtimes
            .iter()
            .map(|p| u64::from(p.pool.spec.drain_grace_period_seconds))
            .max()
            .unwrap_or(30)
            + 10,
    );

    // The router: Route on this same port (gRPC, gRPC-Web, JSON /v1/route), the report
    // stream on a loopback port of its own that the reflectors are told about.
    let signer = join_tokens.then(new_signer);
    let metrics = Arc::new(crate::metrics::OperatorMetrics::new());
    let router = Router::new(
        RouterConfig {
            token_ttl: Duration::from_secs(token_ttl_seconds.max(1)),
            // Off unless the LocalFleet turns them on: on a developer's machine every client
            // is the same loopback address, so per-client reservation limits would refuse
            // the second browser tab's burst.
            max_per_client: reservations_per_client,
            anonymous_share: anonymous_reservation_share,
            ..RouterConfig::default()
        },
        signer.clone(),
        RouterMetrics::new(&metrics.registry),
    );
    let report_listener = tokio::net::TcpListener::bind((bound.ip(), 0))
        .await
        .context("binding the report-stream port")?;
    let report_url = format!(
        "http://{}",
        report_listener
            .local_addr()
            .context("reading the report address")?
    );
    tracing::info!(url = %report_url, "report stream listening (each reflector child has its own credential)");
    // This run's report key stays in memory: each child gets its own credential from it.
    let report_key = ReportKey::new(&rand::random::<[u8; 32]>())?;
    let reflector_launch = LaunchSpec {
        report_url: Some(report_url.clone()),
        require_join_token: signer.is_some(),
        token_keys: signer
            .as_ref()
            .map(|s| Verifier::format_key(s.key_id(), &s.public_key())),
        extra_args: reflector_args,
        ..LaunchSpec::default()
    };
    // A credential for `refleet gateway` processes run beside this fleet (its placement
    // watch shares the report port and key); readable by this user only.
    write_private(
        &data_dir.join("gateway.credential"),
        &report_key.credential(GATEWAY_IDENTITY, "local")?,
    )?;
    let hub = ReportHub::new(router.clone(), Some(report_key.clone()));
    let (stop_reports, reports_stopped) = tokio::sync::oneshot::channel::<()>();
    let reporting = tokio::spawn(reports::serve(report_listener, hub, async {
        let _ = reports_stopped.await;
    }));
    let frontend = Frontend {
        router: router.clone(),
        access: Arc::new(Access::new(HashMap::new(), &[], 1_000_000)),
        leading: always_leading(),
    };

    let shared = Arc::new(RwLock::new(Published::default()));
    // The children's /sessions answer loopback clients, and others with their credential.
    let sessions_http = sessions_client();
    let mut server = Server::new(
        shared.clone(),
        storage,
        max_upload_bytes,
        sessions_http.clone(),
    );
    server.prometheus = Some(crate::local::prometheus::Endpoint::new(
        crate::local::prometheus::Exporter::new(&metrics),
        bound,
    ));
    let view = crate::view::Hub::new("refleet up");
    let mut app = server
        .router()
        .merge(crate::local::server::moves_app(router.clone()))
        .merge(crate::view::http::app(
            view.clone(),
            Arc::new(crate::view::http::Open),
        ))
        .merge(service::app(frontend).await);
    if let Some(dir) = &demo {
        let dir = absolute(dir)?;
        anyhow::ensure!(dir.is_dir(), "--demo {}: not a directory", dir.display());
        tracing::info!(dir = %dir.display(), "serving the demo directory at /demo/");
        app = app.merge(crate::local::demo::app(dir));
    }
    let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(crate::router::listen::serve_app(listener, app, async {
        let _ = server_stopped.await;
    }));
    let (stop_gateways, gateways_stopped) = tokio::sync::watch::channel(false);
    let gateways = start_gateways(
        &runtimes,
        &router,
        bound.ip(),
        &GatewayMetrics::new(&metrics.registry),
        &gateways_stopped,
    )
    .await?;
    println!("refleet: {base}");
    println!("view:    {base} (live fleet view)");
    println!("status:  {base}v1/status");
    if demo.is_some() {
        println!("demo:    {base}demo/");
    }
    println!("route:   {base}v1/route?namespace=default&session=<name>");
    for (region, url) in &gateways {
        println!("gateway: {region} {url}");
    }
    tracing::info!(listen = %bound, storage = %storage_location, reflector = %binary.display(), data_dir = %data_dir.display(), "refleet up started");

    let launcher = ProcessLauncher::new(ProcessSettings {
        binary,
        host: reflector_host,
        launch: reflector_launch,
        logs: child_logs,
        log_dir: data_dir.join("logs"),
        report_key: Some(report_key),
        sessions_http,
    });
    let mut fleet = Fleet::new(launcher, runtimes, sessions)
        .with_metrics(metrics)
        .with_router(router.clone())
        .with_gateways(gateways);
    let started = Instant::now();
    let mut interval = tokio::time::interval(Duration::from_millis(report_interval_millis.max(50)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = refleet_api::shutdown::signal();
    tokio::pin!(stop);
    let mut last_table = String::new();
    loop {
        tokio::select! {
            () = &mut stop => break,
            _ = async {
                tokio::select! {
                    _ = interval.tick() => {}
                    // A client waits for a shard that needs a new reflector: act now.
                    () = router.backend_wanted() => {}
                }
            } => {
                fleet.tick(started.elapsed().as_secs()).await;
                let status = fleet.status();
                let rendered = table::render(&status);
                view.update(status.clone(), router.metrics.routes_total());
                {
                    let mut p = shared.write().unwrap_or_else(|e| e.into_inner());
                    p.status = status;
                    p.live = fleet.live_sessions();
                }
                if rendered != last_table {
                    print_flush(&rendered);
                    last_table = rendered;
                }
            }
        }
    }
    tracing::info!(timeout = ?shutdown_timeout, "stopping: draining every reflector");
    fleet.shutdown(shutdown_timeout).await;
    let _ = stop_gateways.send(true);
    // Open fleet view streams would keep the server's graceful shutdown waiting.
    view.close();
    let _ = stop_server.send(());
    let _ = serving.await;
    let _ = stop_reports.send(());
    let _ = reporting.await;
    print_flush("refleet up stopped\n");
    Ok(())
}

/// Starts a gateway for every region of every pool with `gateway.enabled`, each on a
/// port of its own on `ip`, answering from the router itself; returns region → URL.
/// Without join tokens there are none: the gateway reads the shard from the token.
async fn start_gateways(
    runtimes: &[PoolRuntime],
    router: &Arc<Router>,
    ip: std::net::IpAddr,
    metrics: &GatewayMetrics,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut urls = BTreeMap::new();
    let wanted: Vec<&PoolRuntime> = runtimes
        .iter()
        .filter(|rt| rt.pool.spec.gateway.enabled)
        .collect();
    if wanted.is_empty() {
        return Ok(urls);
    }
    if router.signer().is_none() {
        tracing::warn!(
            "gateway.enabled is ignored with joinTokens: false (the gateway reads the shard from the token); clients join reflectors directly"
        );
        return Ok(urls);
    }
    metrics.watch_connected.set(1);
    let table: Arc<dyn Placements> = Arc::new(RouterTable::new(router.clone()));
    for rt in wanted {
        for region in &rt.pool.spec.regions {
            if urls.contains_key(&region.name) {
                continue;
            }
            let listener = tokio::net::TcpListener::bind((ip, 0))
                .await
                .with_context(|| format!("binding the gateway port of region {}", region.name))?;
            let addr = listener
                .local_addr()
                .context("reading the gateway address")?;
            let gateway = Gateway::new(
                GatewayConfig {
                    region: region.name.clone(),
                    files_url: Some(rt.files_url.clone()),
                    ..GatewayConfig::default()
                },
                table.clone(),
                metrics,
            );
            let mut stop = stopped.clone();
            tokio::spawn(gateway.serve(listener, async move {
                let _ = stop.wait_for(|s| *s).await;
            }));
            let url = format!("http://{addr}/");
            tracing::info!(region = %region.name, %url, "gateway listening");
            urls.insert(region.name.clone(), url);
        }
    }
    Ok(urls)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn print_flush(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// `refleet-reflector` next to this binary (as cargo builds them), else on PATH.
fn default_reflector_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("refleet-reflector")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("refleet-reflector"))
}

/// Text or JSON log lines on stderr, filtered by `RUST_LOG` (default `info`).
pub(crate) fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    // Already set (e.g. by a test): keep that one.
    drop(result);
}

/// A fresh Ed25519 signing key for this run's join tokens.
fn new_signer() -> Signer {
    let secret: [u8; 32] = rand::random();
    Signer::new(format!("local-{}", random_hex(4)), &secret)
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
