//! `refleet gateway`: one region's gateway in a process of its own (a Deployment in a
//! cluster, or beside `refleet up`). Keeps its placement table current from the router
//! leader's placement watch, serves WebSocket upgrades and `/files/` on `--listen`, and
//! `/metrics`, `/healthz` and `/readyz` on `--metrics-listen`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use prometheus::Encoder as _;

use crate::gateway::metrics::GatewayMetrics;
use crate::gateway::watched::{WatchTarget, WatchedTable, follow};
use crate::gateway::{Gateway, GatewayConfig, Placements, StaticTable};
use crate::router::placement_watch::GATEWAY_IDENTITY;
use refleet_api::report_credential::ReportKey;
use refleet_api::token::Verifier;

/// Arguments of `refleet gateway`.
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Address clients connect to (`wss://…/<join token>/<session id>` and `/files/…`
    /// behind your TLS terminator). Its port is printed as `gateway: http://ADDR/`.
    #[arg(long, env = "REFLEET_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// The region this gateway serves (metric label and the router's logs; it proxies any
    /// shard its clients hold a token for).
    #[arg(long, env = "REFLEET_GATEWAY_REGION")]
    pub region: String,

    /// The router's report/placement endpoint, e.g. `http://<release>-report.<namespace>.svc:8081` (the
    /// Service selecting the leader), or the report URL `refleet up` logs.
    #[arg(
        long,
        env = "REFLEET_GATEWAY_ROUTER",
        required_unless_present = "static_reflector"
    )]
    pub router: Option<String>,

    /// Instead of following a router: send every shard to this one reflector (its base URL,
    /// `http://127.0.0.1:7070/`), checking tokens with `--token-keys`. For benchmarks and a
    /// single reflector behind a gateway.
    #[arg(
        long,
        env = "REFLEET_GATEWAY_STATIC_REFLECTOR",
        conflicts_with = "router",
        requires = "token_keys"
    )]
    pub static_reflector: Option<String>,

    /// With `--static-reflector`: the token public keys, `kid=base64url-key,…` (as the
    /// reflector's `--token-keys`).
    #[arg(long, env = "REFLEET_GATEWAY_TOKEN_KEYS")]
    pub token_keys: Option<String>,

    /// The gateway credential (`gateway.<region>.<mac>`, minted from the operator's report
    /// key). Prefer the environment variable or `--credential-file` to keep it off the
    /// command line.
    #[arg(long, env = "REFLEET_GATEWAY_CREDENTIAL", hide_env_values = true)]
    pub credential: Option<String>,

    /// A file holding the gateway credential (e.g. a mounted Secret, or the
    /// `gateway.credential` that `refleet up` writes into its data directory).
    #[arg(long, env = "REFLEET_GATEWAY_CREDENTIAL_FILE", value_name = "FILE")]
    pub credential_file: Option<PathBuf>,

    /// A file holding the operator's report key (the `token` of its report-key Secret):
    /// the gateway mints its own credential from it. Simpler to deploy than a minted
    /// credential, but whoever reads a gateway pod's files could then mint credentials.
    #[arg(long, env = "REFLEET_GATEWAY_REPORT_KEY_FILE", value_name = "FILE", conflicts_with_all = ["credential", "credential_file"])]
    pub report_key_file: Option<PathBuf>,

    /// The pool's files base URL (`http://…/files`): `/files/…` is forwarded there.
    /// Without it `/files/` answers 404.
    #[arg(long, env = "REFLEET_GATEWAY_FILES_URL")]
    pub files_url: Option<String>,

    /// Address serving `/metrics` (Prometheus), `/healthz` and `/readyz` (200 once the
    /// first placement table arrived).
    #[arg(
        long,
        env = "REFLEET_GATEWAY_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// A client must send its whole request head within this time, or is disconnected
    /// (slow-header clients hold no connection for long).
    #[arg(long, env = "REFLEET_GATEWAY_HEADER_TIMEOUT", default_value = "10s")]
    pub header_timeout: humantime::Duration,

    /// Largest request head accepted; a larger one gets 431. At least 8192.
    #[arg(
        long,
        env = "REFLEET_GATEWAY_MAX_HEADER_BYTES",
        default_value_t = 16384
    )]
    pub max_header_bytes: usize,

    /// Most client connections open at once (spliced or still in their request); more
    /// wait in the listen backlog.
    #[arg(long, env = "REFLEET_GATEWAY_MAX_CONNECTIONS", default_value_t = 20000)]
    pub max_connections: usize,

    /// How long a reflector may take to accept a connection and answer its upgrade
    /// (502 after it).
    #[arg(long, env = "REFLEET_GATEWAY_CONNECT_TIMEOUT", default_value = "5s")]
    pub connect_timeout: humantime::Duration,

    /// Join tokens expired longer ago than this are refused with 403 at the gateway;
    /// within it the reflector decides (it lets an admitted view reconnect after expiry).
    #[arg(
        long,
        env = "REFLEET_GATEWAY_EXPIRED_TOKEN_GRACE",
        default_value = "1h"
    )]
    pub expired_token_grace: humantime::Duration,

    /// Log lines as JSON objects instead of text (filter with RUST_LOG).
    #[arg(long, env = "REFLEET_GATEWAY_LOG_JSON")]
    pub log_json: bool,
}

/// Runs the gateway until Ctrl-C or SIGTERM.
pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    super::up::init_tracing(args.log_json);
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let credential = match (
        &args.credential,
        &args.credential_file,
        &args.report_key_file,
    ) {
        (Some(c), _, _) => Some(c.trim().to_owned()),
        (None, Some(path), _) => Some(read(path)?.trim().to_owned()),
        (None, None, Some(path)) => {
            let key = ReportKey::new(read(path)?.trim().as_bytes())
                .with_context(|| format!("the report key in {}", path.display()))?;
            Some(key.credential(GATEWAY_IDENTITY, &args.region)?)
        }
        (None, None, None) => {
            tracing::warn!(
                "no gateway credential: the placement watch is refused unless the router runs without a report key"
            );
            None
        }
    };
    let registry = prometheus::Registry::new();
    let metrics = GatewayMetrics::new(&registry);
    let watched = Arc::new(WatchedTable::default());
    let table: Arc<dyn Placements> = match &args.static_reflector {
        Some(url) => Arc::new(StaticTable::new(
            url.clone(),
            Verifier::parse_list(args.token_keys.as_deref().unwrap_or_default())?,
        )),
        None => watched.clone(),
    };
    if args.static_reflector.is_some() {
        metrics.watch_connected.set(1);
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding --metrics-listen {}", args.metrics_listen))?;
    let metrics_bound = metrics_listener
        .local_addr()
        .context("reading the metrics address")?;
    let gateway = Gateway::new(
        GatewayConfig {
            region: args.region.clone(),
            files_url: args.files_url.clone(),
            header_timeout: args.header_timeout.into(),
            max_header_bytes: args.max_header_bytes,
            max_connections: args.max_connections,
            connect_timeout: args.connect_timeout.into(),
            expired_token_grace: args.expired_token_grace.into(),
            ..GatewayConfig::default()
        },
        table.clone(),
        &metrics,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let watching = args.router.clone().map(|endpoint| {
        tokio::spawn(follow(
            WatchTarget {
                endpoint,
                credential,
                region: args.region.clone(),
            },
            watched.clone(),
            metrics.clone(),
            stopped(stop_rx.clone()),
        ))
    });
    let http = {
        let table = table.clone();
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = table.verifier().is_some();
                    async move {
                        if ready {
                            (axum::http::StatusCode::OK, "ready\n")
                        } else {
                            (
                                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                                "no placement table yet\n",
                            )
                        }
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || {
                    let mut out = Vec::new();
                    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut out);
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            out,
                        )
                    }
                }),
            );
        tokio::spawn(
            axum::serve(metrics_listener, app)
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
        )
    };
    let serving = tokio::spawn(gateway.serve(listener, stopped(stop_rx.clone())));
    println!("gateway: http://{bound}/");
    println!("metrics: http://{metrics_bound}/metrics");
    tracing::info!(listen = %bound, region = %args.region, router = ?args.router, static_reflector = ?args.static_reflector, "gateway started");
    refleet_api::shutdown::signal().await;
    tracing::info!("gateway stopping");
    let _ = stop_tx.send(true);
    let _ = serving.await;
    if let Some(w) = watching {
        let _ = w.await;
    }
    let _ = http.await;
    Ok(())
}
