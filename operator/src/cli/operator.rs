//! `refleet operator`: the controllers in a cluster, leader-elected, with `/metrics` and
//! `/healthz` on an HTTP port.
//!
//! Every instance serves `/metrics` and `/healthz`; only the instance holding the Lease runs
//! the ReflectorPool and Session controllers. Stopping (SIGTERM / Ctrl-C) stops the
//! controllers and releases the Lease, so another instance takes over at once.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use kube::Client;
use tokio::net::TcpListener;

use crate::cli::routing::{Routing, RoutingArgs};
use crate::controller::leader::{LeaseSettings, lead};
use crate::controller::observe::{HttpLoad, LoadSource};
use crate::controller::reconcile::run_controllers;
use crate::controller::{Context, FIELD_MANAGER};
use crate::metrics::OperatorMetrics;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Arguments of `refleet operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct OperatorArgs {
    /// Namespaces to watch, comma-separated. Default: all namespaces.
    #[arg(long, env = "REFLEET_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Name of the coordination.k8s.io Lease used for leader election.
    #[arg(long, env = "REFLEET_LEASE_NAME", default_value = "refleet-operator")]
    pub lease_name: String,

    /// Namespace of the Lease. Default: the client's namespace (the pod's own namespace in
    /// a cluster, the kubeconfig context's namespace outside).
    #[arg(long, env = "REFLEET_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This instance's identity in the Lease. Default: `$POD_NAME`, else `$HOSTNAME`, else
    /// `refleet-<pid>`.
    #[arg(long, env = "REFLEET_IDENTITY")]
    pub identity: Option<String>,

    /// How long the Lease stays valid without renewal: the longest a crashed leader's
    /// successor waits.
    #[arg(long, env = "REFLEET_LEASE_DURATION", default_value = "15s")]
    pub lease_duration: humantime::Duration,

    /// How long before the Lease expires the leader renews it.
    #[arg(long, env = "REFLEET_LEASE_RENEW_BEFORE", default_value = "5s")]
    pub lease_renew_before: humantime::Duration,

    /// Address of the HTTP endpoint serving `/metrics` (Prometheus) and `/healthz`.
    #[arg(long, env = "REFLEET_METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: SocketAddr,

    /// How often every pool is re-synced without any change (reflector load is polled at
    /// this rate).
    #[arg(long, env = "REFLEET_RESYNC", default_value = "10s")]
    pub resync: humantime::Duration,

    /// How often at most a Session's status is rewritten when only its user counts changed
    /// (any other change is written at once). Bounds the operator's status writes under user
    /// churn to one per Session per this period; a deferred count is written by the first
    /// sync after it (at most this plus `--resync` late). 0s: write every change.
    #[arg(long, env = "REFLEET_STATUS_COUNTS_EVERY", default_value = "10s")]
    pub status_counts_every: humantime::Duration,

    /// The shortest time between the starts of two syncs of one pool (its plan, pods and
    /// statuses) that watch events trigger. A sync's own status writes are such events, so
    /// without a pace a busy pool is synced back to back and the leader spends a core on it.
    /// A Route waiting for a new reflector ends the wait early, but no sooner than the last
    /// sync's duration again after its start (syncs take at most half the time however many
    /// Routes wait). 0s: no pace.
    #[arg(long, env = "REFLEET_MIN_SYNC_INTERVAL", default_value = "1s")]
    pub min_sync_interval: humantime::Duration,

    /// Log format (filter with `RUST_LOG`, default `info`).
    #[arg(long, env = "REFLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Routing: Route, the report stream, join tokens, API keys.
    #[command(flatten)]
    pub routing: RoutingArgs,
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format);
    crate::controller::install_crypto_provider();
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let listener = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    // The controllers present each pod's report credential when they read its load; the key
    // comes from the router (Routing::start reads or creates its Secret).
    let load = HttpLoad::new();
    serve(
        client,
        args,
        listener,
        Arc::new(load),
        refleet_api::shutdown::signal(),
    )
    .await
}

/// Runs the operator with `client`, serving `/metrics` and `/healthz` on `listener`, until
/// `shutdown` resolves. Tests call this directly (with their own client and load source).
pub async fn serve(
    client: Client,
    args: OperatorArgs,
    listener: TcpListener,
    load: Arc<dyn LoadSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let OperatorArgs {
        namespaces,
        lease_name,
        lease_namespace,
        identity,
        lease_duration,
        lease_renew_before,
        metrics_listen: _,
        resync,
        status_counts_every,
        min_sync_interval,
        log_format: _,
        routing,
    } = args;
    let identity = identity
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("refleet-{}", std::process::id()));
    let lease_namespace = lease_namespace.unwrap_or_else(|| client.default_namespace().to_owned());
    let metrics = Arc::new(OperatorMetrics::new());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let http = {
        let metrics = metrics.clone();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/metrics",
                get(move || {
                    let metrics = metrics.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            metrics.render(),
                        )
                    }
                }),
            );
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
        })
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let routing = {
        let mut rx = stop_rx.clone();
        Arc::new(
            Routing::start(
                client.clone(),
                routing,
                &lease_namespace,
                &metrics.registry,
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
            )
            .await?,
        )
    };
    let mut ctx = Context::new(client.clone(), &identity, load, metrics.clone());
    ctx.resync = *resync;
    ctx.status_counts_every = *status_counts_every;
    ctx.min_sync_interval = *min_sync_interval;
    ctx.router = Some(routing.router.clone());
    ctx.reflector_env.clone_from(&routing.reflector_env);
    ctx.report_key.clone_from(&routing.report_key);
    let ctx = Arc::new(ctx);
    let settings = LeaseSettings {
        name: lease_name,
        namespace: lease_namespace,
        identity: identity.clone(),
        duration: *lease_duration,
        grace: *lease_renew_before,
    };
    tracing::info!(%identity, field_manager = FIELD_MANAGER, "operator starting");
    let mut shutdown_rx = stop_rx.clone();
    let leading_metrics = metrics.clone();
    let result = lead(
        client,
        settings,
        async move {
            let _ = shutdown_rx.wait_for(|s| *s).await;
        },
        move |leading| {
            leading_metrics.set_leader(leading);
            let routing = routing.clone();
            tokio::spawn(async move { routing.set_leading(leading).await });
        },
        |lost| {
            let ctx = ctx.clone();
            let namespaces = namespaces.clone();
            async move {
                let lost = futures_util::FutureExt::shared(lost);
                if namespaces.is_empty() {
                    run_controllers(ctx.clone(), None, lost).await;
                } else {
                    let runs = namespaces
                        .iter()
                        .map(|ns| run_controllers(ctx.clone(), Some(ns), lost.clone()));
                    futures_util::future::join_all(runs).await;
                }
                ctx.forget();
            }
        },
    )
    .await;
    // Wait for the HTTP server (it stops with the shutdown signal).
    let mut rx = stop_rx;
    let _ = rx.wait_for(|s| *s).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    result.context("leader election")
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
