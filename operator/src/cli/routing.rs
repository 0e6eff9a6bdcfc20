//! The routing half of `refleet operator`: flags, the router's and the report stream's
//! servers (with the keys from [`crate::secrets`]), and the leader label on the operator's own
//! pod.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{EnvVar, Pod};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use refleet_api::reflector::launch::LaunchSpec;
use refleet_api::report_credential::ReportKey;
use refleet_api::token::Verifier;

use crate::router::client::TrustedProxies;
use crate::router::reports::{self, ReportHub};
use crate::router::service::{self, Access, Frontend};
use crate::router::{Router, RouterConfig};
use crate::secrets;

/// The label the leader puts on its own pod; the router and report Services select it.
pub const LEADER_LABEL: &str = "refleet.dev/leader";

/// Routing flags of `refleet operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct RoutingArgs {
    /// Address of the router: gRPC `refleet.routing.v1.Routing` (h2c) with health and
    /// reflection, gRPC-Web, JSON `GET /v1/route` / `GET /v1/shards`, and the read-only
    /// fleet view at `/` (docs/fleet-view.md) under the same access rules. Only the leader
    /// answers (others: UNAVAILABLE / HTTP 503).
    #[arg(long, env = "REFLEET_ROUTER_LISTEN", default_value = "0.0.0.0:8080")]
    pub router_listen: SocketAddr,

    /// Address of the report stream (`refleet.report.v1.Reports`) the reflectors connect
    /// to. Cluster-internal.
    #[arg(long, env = "REFLEET_REPORT_LISTEN", default_value = "0.0.0.0:8081")]
    pub report_listen: SocketAddr,

    /// Secret (in the operator's namespace) holding the report key (key `token`, at least 16
    /// bytes), created with a random key if missing. The operator derives from it one
    /// credential per reflector pod it creates, which proves that pod's name and region on the
    /// report stream. Without it the stream is unauthenticated (development only). Changing
    /// the key invalidates the credentials of running reflectors: replace their pods.
    #[arg(long, env = "REFLEET_REPORT_SECRET")]
    pub report_secret: Option<String>,

    /// How long after its last report a reflector's reported users still count and it still
    /// gets routes; a report stream silent that long is closed. Must exceed the reflectors'
    /// report interval (1s).
    #[arg(long, env = "REFLEET_REPORT_GRACE", default_value = "5s")]
    pub report_grace: humantime::Duration,

    /// The report-stream URL given to the reflector pods the operator creates, e.g.
    /// `http://refleet-report.refleet-system.svc:8081`. Without it reflectors do not report
    /// (the router then counts users from the reflectors' /sessions via the controllers).
    #[arg(long, env = "REFLEET_REFLECTOR_REPORT_URL")]
    pub reflector_report_url: Option<String>,

    /// Sign join tokens and make reflectors require them for a view's first JOIN.
    #[arg(long, env = "REFLEET_JOIN_TOKENS", default_value_t = true, action = clap::ArgAction::Set)]
    pub join_tokens: bool,

    /// Secret (in the operator's namespace) holding the token signing key (`kid`,
    /// `signing-key`: 32 raw bytes). Created if missing; replace both keys to rotate.
    #[arg(
        long,
        env = "REFLEET_TOKEN_SECRET",
        default_value = "refleet-join-token"
    )]
    pub token_secret: String,

    /// How long a join token, and the reservation behind it, is valid.
    #[arg(long, env = "REFLEET_TOKEN_TTL", default_value = "60s")]
    pub token_ttl: humantime::Duration,

    /// Directory of API keys (a mounted Secret): each file is named after an appId and holds
    /// that app's key(s), one per line. When set, Route needs `x-api-key` (or
    /// `authorization: Bearer`) with a key of the Session's appId; an empty directory refuses
    /// every Route until keys appear. Re-read every 30 s, so keys can change without a restart.
    #[arg(long, env = "REFLEET_API_KEYS_DIR")]
    pub api_keys_dir: Option<PathBuf>,

    /// Browser origins allowed to call the router (CORS and the Origin check), comma-separated;
    /// `*` allows any.
    #[arg(
        long,
        env = "REFLEET_ALLOWED_ORIGINS",
        value_delimiter = ',',
        default_value = "*"
    )]
    pub allowed_origins: Vec<String>,

    /// Route calls per second per client; bursts of twice that. A client is a known API key,
    /// else its address (IPv6 by /64, through --trusted-proxies); an unknown key counts as
    /// its address.
    #[arg(long, env = "REFLEET_ROUTE_RATE_LIMIT", default_value_t = 100)]
    pub route_rate_limit: u32,

    /// Proxies in front of the router (your Ingress or load balancer), as IP addresses or
    /// CIDR blocks, comma-separated. When the connecting address is one of them, the client
    /// is the right-most address of X-Forwarded-For (else Forwarded) that is not one of
    /// them. Empty: the connecting address is the client and those headers are ignored.
    #[arg(long, env = "REFLEET_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_proxy)]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// How long a Route's reservation holds its place when nobody joins with it (at most
    /// --token-ttl; the token stays valid for --token-ttl, and a late join is still
    /// admitted up to the shard's hard cap).
    #[arg(long, env = "REFLEET_RESERVATION_CLAIM_WINDOW", default_value = "15s")]
    pub reservation_claim_window: humantime::Duration,

    /// Reservations a caller without an API key (one client address) may hold per Session
    /// within their claim window; more Routes get RESOURCE_EXHAUSTED / HTTP 429. 0: no limit.
    #[arg(long, env = "REFLEET_MAX_RESERVATIONS_PER_CLIENT", default_value_t = 4)]
    pub max_reservations_per_client: u32,

    /// Share (0 to 1) of a Session's free places that callers without an API key may hold
    /// together. Past it they are still routed, without a reserved place and never to a
    /// new shard. 1: no limit.
    #[arg(long, env = "REFLEET_ANONYMOUS_RESERVATION_SHARE", default_value_t = 0.5, value_parser = parse_share)]
    pub anonymous_reservation_share: f64,

    /// This pod's name (downward API); the leader labels it `refleet.dev/leader=true`.
    #[arg(long, env = "REFLEET_POD_NAME")]
    pub pod_name: Option<String>,

    /// This pod's namespace (downward API).
    #[arg(long, env = "REFLEET_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

fn parse_proxy(s: &str) -> Result<ipnet::IpNet, crate::router::client::ProxyParseError> {
    crate::router::client::parse_proxy(s)
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number from 0 to 1")),
    }
}

/// How often `--api-keys-dir` is read again.
const KEYS_RELOAD: std::time::Duration = std::time::Duration::from_secs(30);

impl RoutingArgs {
    /// The defaults with loopback ports chosen by the OS and tokens off: for tests.
    pub fn loopback() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            routing: RoutingArgs,
        }
        <Only as clap::Parser>::parse_from([
            "refleet",
            "--router-listen=127.0.0.1:0",
            "--report-listen=127.0.0.1:0",
            "--join-tokens=false",
            "--route-rate-limit=1000",
        ])
        .routing
    }
}

/// The running routing half.
pub struct Routing {
    /// The router (given to the controllers).
    pub router: Arc<Router>,
    /// Whether this replica leads.
    pub leading: Arc<AtomicBool>,
    /// Env the reflector pods get (report URL, token keys).
    pub reflector_env: Vec<EnvVar>,
    /// Mints each reflector pod's report credential (`None`: reflectors do not report, or
    /// the stream is unauthenticated).
    pub report_key: Option<ReportKey>,
    /// Where the router listens.
    pub router_addr: SocketAddr,
    /// Where the report stream listens.
    pub report_addr: SocketAddr,
    client: Client,
    pod: Option<(String, String)>,
}

/// Reads the API keys again every [`KEYS_RELOAD`] (a mounted Secret changes in place); a
/// read that fails keeps the keys in use.
async fn reload_keys(dir: PathBuf, access: Arc<Access>) {
    let mut last = Access::read_keys(&dir).ok();
    let mut tick = tokio::time::interval(KEYS_RELOAD);
    tick.tick().await;
    loop {
        tick.tick().await;
        match Access::read_keys(&dir) {
            Ok(keys) if last.as_ref() != Some(&keys) => {
                let apps: std::collections::BTreeSet<&String> = keys.values().collect();
                tracing::info!(keys = keys.len(), apps = apps.len(), "API keys reloaded");
                access.set_keys(keys.clone());
                last = Some(keys);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "API keys not reloaded; keeping the previous ones")
            }
        }
    }
}

impl Routing {
    /// Sets up keys, the router, and binds both listeners; `namespace` is the operator's.
    pub async fn start(
        client: Client,
        args: RoutingArgs,
        namespace: &str,
        registry: &prometheus::Registry,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let signer = match args.join_tokens {
            true => Some(secrets::signing_key(&client, namespace, &args.token_secret).await?),
            false => None,
        };
        let report_key = match &args.report_secret {
            Some(name) => Some(secrets::report_key(&client, namespace, name).await?),
            None => {
                tracing::warn!(
                    "no --report-secret: the report stream accepts reflectors without a credential (each stream is still pinned to one reflector and a known region); for development only"
                );
                None
            }
        };
        let keys = match &args.api_keys_dir {
            Some(dir) => Some(Access::read_keys(dir)?),
            None => None,
        };
        if keys.as_ref().is_some_and(HashMap::is_empty) {
            tracing::warn!(dir = ?args.api_keys_dir, "API keys are required and none are configured: every Route is refused until keys are added");
        }
        let router = Router::new(
            RouterConfig {
                token_ttl: *args.token_ttl,
                report_grace: *args.report_grace,
                warm_up: true,
                claim_window: *args.reservation_claim_window,
                max_per_client: args.max_reservations_per_client,
                anonymous_share: args.anonymous_reservation_share,
                ..RouterConfig::default()
            },
            signer.clone(),
            crate::router::metrics::RouterMetrics::new(registry),
        );
        let leading = Arc::new(AtomicBool::new(false));
        let reflector_env = crate::controller::pod::env_vars(&LaunchSpec {
            report_url: args.reflector_report_url.clone(),
            require_join_token: signer.is_some(),
            token_keys: signer
                .as_ref()
                .map(|s| Verifier::format_key(s.key_id(), &s.public_key())),
            ..LaunchSpec::default()
        });
        let router_listener = tokio::net::TcpListener::bind(args.router_listen)
            .await
            .with_context(|| format!("binding --router-listen {}", args.router_listen))?;
        let report_listener = tokio::net::TcpListener::bind(args.report_listen)
            .await
            .with_context(|| format!("binding --report-listen {}", args.report_listen))?;
        let router_addr = router_listener.local_addr()?;
        let report_addr = report_listener.local_addr()?;
        let mut access = Access::new(HashMap::new(), &args.allowed_origins, args.route_rate_limit)
            .trusting(TrustedProxies::new(args.trusted_proxies.clone()));
        if let Some(keys) = keys {
            access = access.requiring_keys(keys);
        }
        let access = Arc::new(access);
        if let Some(dir) = args.api_keys_dir.clone() {
            tokio::spawn(reload_keys(dir, access.clone()));
        }
        let frontend = Frontend {
            router: router.clone(),
            access,
            leading: leading.clone(),
        };
        let hub = ReportHub::new(router.clone(), report_key.clone()).only_when(leading.clone());
        let shutdown = futures_util::FutureExt::shared(Box::pin(shutdown));
        // The fleet view on the router's port, behind Route's access rules; it follows the
        // router until shutdown, which also ends its event streams.
        let view = crate::view::Hub::new("refleet operator");
        tokio::spawn(crate::view::follow_router(
            view.clone(),
            router.clone(),
            shutdown.clone(),
        ));
        let s1 = shutdown.clone();
        tokio::spawn(async move {
            let app = service::app(frontend.clone())
                .await
                .merge(crate::view::http::app(view, Arc::new(frontend)));
            crate::router::listen::serve_app(router_listener, app, s1).await;
        });
        tokio::spawn(async move {
            if let Err(e) = reports::serve(report_listener, hub, shutdown).await {
                tracing::error!(error = %e, "report server failed");
            }
        });
        tracing::info!(router = %router_addr, report = %report_addr, tokens = signer.is_some(), "routing ready");
        let pod = args.pod_name.clone().zip(
            args.pod_namespace
                .clone()
                .or_else(|| Some(namespace.to_owned())),
        );
        Ok(Self {
            router,
            leading,
            reflector_env,
            report_key: report_key.filter(|_| args.reflector_report_url.is_some()),
            router_addr,
            report_addr,
            client,
            pod: pod.map(|(n, ns)| (ns, n)),
        })
    }

    /// Leadership changed: route (after a warm-up) only while leading, and move the label.
    pub async fn set_leading(&self, leading: bool) {
        if leading {
            self.router.reset();
        }
        self.leading.store(leading, Ordering::Relaxed);
        let Some((ns, name)) = &self.pod else {
            return;
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let value = if leading {
            serde_json::json!("true")
        } else {
            serde_json::Value::Null
        };
        let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => tracing::info!(pod = %name, leading, "leader label updated"),
            Err(e) => tracing::warn!(pod = %name, error = %e, "could not update the leader label"),
        }
    }
}
