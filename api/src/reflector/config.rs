//! Command-line and environment configuration of `refleet-reflector`.
//!
//! Every flag has an environment variable (`REFLEET_…`) so the same settings work from a
//! shell, a Kubernetes Pod spec or the operator's local backend.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Refleet's reflector: orders and fans out the events of Multisynq/Croquet sessions.
///
/// One port serves everything: WebSocket upgrades at any path (the session id is the last
/// path segment, so `box: "http://HOST:PORT/"` works with the unmodified client), the files
/// endpoint under `/files/` for snapshots and persisted data, `/healthz`, `/readyz` and
/// `/metrics`. On SIGTERM it drains: new sessions are refused, existing ones are served until
/// they end or `--drain-timeout` passes, then their state is stored so a reflector started on
/// the same storage resumes them on the same timeline.
#[derive(Debug, Clone, Parser)]
#[command(name = "refleet-reflector", version, about, long_about)]
pub struct Config {
    /// Address to listen on (WebSocket sessions, files, health and metrics).
    #[arg(long, env = "REFLEET_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,

    /// Public base URL that clients use to reach this reflector; printed as the `box` URL.
    /// Default: http://<listen address>/ (0.0.0.0 shown as 127.0.0.1).
    #[arg(long, env = "REFLEET_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Public base URL of the files endpoint. Clients bake it into every snapshot and
    /// persisted-data URL they share, so in a fleet it must be stable and reachable by all
    /// clients. Default: <public url>files.
    #[arg(long, env = "REFLEET_FILES_URL")]
    pub files_url: Option<String>,

    /// Where snapshots, persisted data and session state live: a directory (relative paths
    /// are under the working directory), a file:// URL, or an object store URL such as
    /// s3://bucket/prefix configured through the usual AWS_* variables (AWS_ENDPOINT,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP).
    #[arg(long, env = "REFLEET_STORAGE", default_value = "refleet-data")]
    pub storage: String,

    /// Region this reflector runs in (a label on metrics and in reports).
    #[arg(long, env = "REFLEET_REGION", default_value = "local")]
    pub region: String,

    /// Name reported to clients in SYNC (`reflector`) and used in logs.
    #[arg(long, env = "REFLEET_REFLECTOR_NAME", default_value = "refleet")]
    pub reflector_name: String,

    /// Largest WebSocket frame accepted from a client, in bytes; larger frames close the
    /// connection with 1009. The real client never sends more than about 16 KiB.
    #[arg(long, env = "REFLEET_MAX_FRAME_BYTES", default_value_t = 1 << 20)]
    pub max_frame_bytes: usize,

    /// Largest upload accepted by the files endpoint, in bytes (HTTP 413 above it). Uploads
    /// are streamed to storage, so this does not bound memory; `--max-uploads` does.
    #[arg(long, env = "REFLEET_MAX_UPLOAD_BYTES", default_value_t = 64 << 20)]
    pub max_upload_bytes: usize,

    /// An upload whose body sends nothing for this long is dropped (HTTP 408) and nothing is
    /// stored.
    #[arg(long, env = "REFLEET_UPLOAD_IDLE_TIMEOUT", default_value = "15s")]
    pub upload_idle_timeout: humantime::Duration,

    /// Most uploads read at once; further ones get HTTP 503 with Retry-After. Each holds up
    /// to about 10 MiB while it streams in.
    #[arg(long, env = "REFLEET_MAX_UPLOADS", default_value_t = 16)]
    pub max_uploads: usize,

    /// Most uploads read at once from one client address; further ones get HTTP 429 with
    /// Retry-After. The real client uploads one file at a time.
    #[arg(long, env = "REFLEET_MAX_UPLOADS_PER_PEER", default_value_t = 4)]
    pub max_uploads_per_peer: usize,

    /// Messages per second one connection may send on average; exceeding it closes the
    /// connection with 4104. The real client sends at most 60 per second.
    #[arg(long, env = "REFLEET_RATE_LIMIT", default_value_t = 300)]
    pub rate_limit: u32,

    /// Messages one connection may send in a burst above `--rate-limit`.
    #[arg(long, env = "REFLEET_RATE_BURST", default_value_t = 600)]
    pub rate_burst: u32,

    /// Frames queued per connection before the client counts as too slow and is
    /// disconnected with 4001 (it reconnects and catches up from the session's messages).
    #[arg(long, env = "REFLEET_SEND_QUEUE", default_value_t = 4096)]
    pub send_queue: usize,

    /// Bytes queued per connection and not yet written to its socket before the client counts
    /// as too slow and is disconnected with 4001, like --send-queue. A SYNC does not count (it
    /// is bounded by --max-retained-bytes). Raised to --max-frame-bytes + 64 KiB if lower, so
    /// that one largest message always fits.
    #[arg(long, env = "REFLEET_MAX_QUEUED_BYTES", default_value_t = 8 << 20)]
    pub max_queued_bytes: usize,

    /// Most simultaneous WebSocket connections; further upgrades get HTTP 503.
    #[arg(long, env = "REFLEET_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// How long a session with no clients is kept in memory (same timeline, so clients that
    /// come back rejoin seamlessly). Never shorter than the clients' leave delay plus 2 s.
    #[arg(long, env = "REFLEET_EMPTY_SESSION_TTL", default_value = "10s")]
    pub empty_session_ttl: humantime::Duration,

    /// How long a draining reflector keeps serving live sessions before storing them and
    /// closing their clients with 4003.
    #[arg(long, env = "REFLEET_DRAIN_TIMEOUT", default_value = "30s")]
    pub drain_timeout: humantime::Duration,

    /// How often each live session's state is stored while it runs (only when it changed),
    /// so a crash of this reflector loses at most this much: another reflector resumes the
    /// session from its last checkpoint, on a fresh timeline (see docs/continuity.md). 0
    /// turns checkpoints off (state is then stored only when a session ends or moves).
    #[arg(long, env = "REFLEET_CHECKPOINT_INTERVAL", default_value = "1s")]
    pub checkpoint_interval: humantime::Duration,

    /// How long users of a resumed session are kept as members while they reconnect; users
    /// not back by then are announced as having left.
    #[arg(long, env = "REFLEET_REJOIN_GRACE", default_value = "10s")]
    pub rejoin_grace: humantime::Duration,

    /// A connection that sends no JOIN within this time is closed with 4121.
    #[arg(long, env = "REFLEET_JOIN_TIMEOUT", default_value = "35s")]
    pub join_timeout: humantime::Duration,

    /// A connection that sends nothing (not even a PULSE or a pong) for this long is closed
    /// with 4002. The client sends at least a PULSE every 25 s.
    #[arg(long, env = "REFLEET_IDLE_TIMEOUT", default_value = "60s")]
    pub idle_timeout: humantime::Duration,

    /// Tick interval of a session until its first JOIN asks for one.
    #[arg(long, env = "REFLEET_DEFAULT_TICK", default_value = "200ms")]
    pub default_tick: humantime::Duration,

    /// Snapshots kept per session in storage; older ones are deleted once a newer one is
    /// accepted (0 keeps all).
    #[arg(long, env = "REFLEET_SNAPSHOT_RETENTION", default_value_t = 3)]
    pub snapshot_retention: usize,

    /// Views a session remembers after they left, besides its members, so that a returning
    /// view is known again (no fresh token needed; not counted against the cap again). Past
    /// it the session forgets half of them at once. Each costs 40–80 bytes (fingerprints of
    /// its user record and token, however large the record); views with a token are stored
    /// with the session's state.
    #[arg(long, env = "REFLEET_FORMER_VIEWS", default_value_t = 1024)]
    pub former_views: usize,

    /// Messages retained since the last snapshot at which the reflector starts asking
    /// clients for a snapshot (REQU).
    #[arg(long, env = "REFLEET_REQU_MESSAGES", default_value_t = 60_000)]
    pub requ_messages: usize,

    /// Hard cap of messages retained since the last snapshot; further SENDs are dropped
    /// with an INFO SNAPSHOT_NEEDED until a snapshot arrives.
    #[arg(long, env = "REFLEET_MAX_MESSAGES", default_value_t = 100_000)]
    pub max_messages: usize,

    /// Hard cap of the bytes of messages retained since the last snapshot, per session;
    /// past it SENDs are dropped like past --max-messages. Late joiners receive all retained
    /// messages in their SYNC, so this also bounds a SYNC.
    #[arg(long, env = "REFLEET_MAX_RETAINED_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_retained_bytes: usize,

    /// The operator's report-stream endpoint (e.g. `http://refleet-report.refleet-system.svc:8081`).
    /// When set, the reflector keeps a gRPC stream open to it, reports its load about once a
    /// second and at once on change, and follows its instructions (drain, shard caps, token
    /// keys). Reconnects with back-off, so it reaches a new leader after a failover.
    #[arg(long, env = "REFLEET_REPORT_URL")]
    pub report_url: Option<String>,

    /// File holding this reflector's report credential, presented on the report stream
    /// (`authorization: Bearer …`). The operator mints one per reflector
    /// (`<name>.<region>.<mac>`) and accepts from the stream only reports about that
    /// reflector and region; `refleet operator` and `refleet up` set REFLEET_REPORT_TOKEN.
    #[arg(long, env = "REFLEET_REPORT_TOKEN_FILE")]
    pub report_token_file: Option<std::path::PathBuf>,

    /// The report credential itself (alternative to --report-token-file). The same value
    /// (`authorization: Bearer …`) lets the operator read `/sessions`, which otherwise answers
    /// only clients on a loopback address.
    #[arg(long, env = "REFLEET_REPORT_TOKEN", hide_env_values = true)]
    pub report_token: Option<String>,

    /// How often the load report is sent when nothing changes.
    #[arg(long, env = "REFLEET_REPORT_INTERVAL", default_value = "1s")]
    pub report_interval: humantime::Duration,

    /// Pool this reflector belongs to (`namespace/name`), carried in reports.
    #[arg(long, env = "REFLEET_POOL", default_value = "")]
    pub pool: String,

    /// Ed25519 public keys join tokens are checked with: `kid=base64url-key,…`. The operator
    /// also sends its keys over the report stream.
    #[arg(long, env = "REFLEET_TOKEN_KEYS", default_value = "")]
    pub token_keys: String,

    /// Refuse (close 4103) a view's first JOIN unless the URL carries a valid, unexpired join
    /// token for the JOIN's appId and session name. Reconnects of admitted views always pass.
    #[arg(long, env = "REFLEET_REQUIRE_JOIN_TOKEN")]
    pub require_join_token: bool,

    /// Log line format on stderr (filter with RUST_LOG, e.g. RUST_LOG=refleet_reflector=debug).
    #[arg(long, env = "REFLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Limits and timings the sessions and connections need at run time.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_upload_bytes: usize,
    pub upload_idle_timeout: Duration,
    pub max_uploads: usize,
    pub max_uploads_per_peer: usize,
    pub rate_limit: u32,
    pub rate_burst: u32,
    pub send_queue: usize,
    pub max_queued_bytes: usize,
    pub max_connections: usize,
    pub empty_session_ttl: Duration,
    pub drain_timeout: Duration,
    pub checkpoint_interval: Duration,
    pub rejoin_grace: Duration,
    pub join_timeout: Duration,
    pub idle_timeout: Duration,
    pub default_tick: Duration,
    pub snapshot_retention: usize,
    pub former_views: usize,
    pub requ_messages: usize,
    pub max_messages: usize,
    pub max_retained_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::from(&Config::parse_from(["refleet-reflector"]))
    }
}

impl From<&Config> for Limits {
    fn from(c: &Config) -> Self {
        let Config {
            max_frame_bytes,
            max_upload_bytes,
            upload_idle_timeout,
            max_uploads,
            max_uploads_per_peer,
            rate_limit,
            rate_burst,
            send_queue,
            max_queued_bytes,
            max_connections,
            empty_session_ttl,
            drain_timeout,
            checkpoint_interval,
            rejoin_grace,
            join_timeout,
            idle_timeout,
            default_tick,
            snapshot_retention,
            former_views,
            requ_messages,
            max_messages,
            max_retained_bytes,
            listen: _,
            public_url: _,
            files_url: _,
            storage: _,
            region: _,
            reflector_name: _,
            log_format: _,
            report_url: _,
            report_token_file: _,
            report_token: _,
            report_interval: _,
            pool: _,
            token_keys: _,
            require_join_token: _,
        } = c;
        Self {
            max_frame_bytes: *max_frame_bytes,
            max_upload_bytes: *max_upload_bytes,
            upload_idle_timeout: (*upload_idle_timeout).into(),
            max_uploads: (*max_uploads).max(1),
            max_uploads_per_peer: (*max_uploads_per_peer).max(1),
            rate_limit: (*rate_limit).max(1),
            rate_burst: (*rate_burst).max(1),
            send_queue: (*send_queue).max(16),
            // A RECV is the client's frame plus a short envelope: the largest must fit.
            max_queued_bytes: (*max_queued_bytes).max(max_frame_bytes.saturating_add(64 << 10)),
            max_connections: *max_connections,
            empty_session_ttl: (*empty_session_ttl).into(),
            drain_timeout: (*drain_timeout).into(),
            checkpoint_interval: (*checkpoint_interval).into(),
            rejoin_grace: (*rejoin_grace).into(),
            join_timeout: (*join_timeout).into(),
            idle_timeout: (*idle_timeout).into(),
            default_tick: (*default_tick).into(),
            snapshot_retention: *snapshot_retention,
            former_views: *former_views,
            requ_messages: *requ_messages,
            max_messages: (*max_messages).max(1),
            max_retained_bytes: (*max_retained_bytes).max(1),
        }
    }
}

impl Config {
    /// The report-stream secret (`--report-token`, else the contents of
    /// `--report-token-file`), if one is configured. It also guards `/sessions`.
    pub fn report_secret(&self) -> std::io::Result<Option<String>> {
        match (&self.report_token, &self.report_token_file) {
            (Some(t), _) => Ok(Some(t.trim().to_owned())),
            (None, Some(path)) => Ok(Some(std::fs::read_to_string(path)?.trim().to_owned())),
            (None, None) => Ok(None),
        }
        .map(|t| t.filter(|t| !t.is_empty()))
    }

    /// The public base URL with exactly one trailing slash.
    pub fn public_base(&self, bound: SocketAddr) -> String {
        let mut base = match &self.public_url {
            Some(url) => url.clone(),
            None => {
                let host = if bound.ip().is_unspecified() {
                    "127.0.0.1".to_string()
                } else {
                    bound.ip().to_string()
                };
                let host = if bound.is_ipv6() && !bound.ip().is_unspecified() {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("http://{host}:{}/", bound.port())
            }
        };
        if !base.ends_with('/') {
            base.push('/');
        }
        base
    }

    /// The public files base URL without a trailing slash.
    pub fn files_base(&self, bound: SocketAddr) -> String {
        let base = match &self.files_url {
            Some(url) => url.clone(),
            None => format!("{}files", self.public_base(bound)),
        };
        base.trim_end_matches('/').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_make_a_working_reflector_on_port_7070() {
        let c = Config::parse_from(["refleet-reflector"]);
        assert_eq!(c.listen, "0.0.0.0:7070".parse().expect("addr"));
        assert_eq!(c.public_base(c.listen), "http://127.0.0.1:7070/");
        assert_eq!(c.files_base(c.listen), "http://127.0.0.1:7070/files");
        let l = Limits::from(&c);
        assert_eq!(l.empty_session_ttl, Duration::from_secs(10));
        assert_eq!(l.default_tick, Duration::from_millis(200));
        assert_eq!(l.max_queued_bytes, 8 << 20);
        let small = Config::parse_from(["refleet-reflector", "--max-queued-bytes", "1"]);
        assert_eq!(
            Limits::from(&small).max_queued_bytes,
            (1 << 20) + (64 << 10),
            "one largest message always fits"
        );
    }

    #[test]
    fn explicit_urls_are_normalised() {
        let c = Config::parse_from([
            "refleet-reflector",
            "--public-url",
            "https://r1.example.com",
            "--files-url",
            "https://files.example.com/pool/",
        ]);
        assert_eq!(c.public_base(c.listen), "https://r1.example.com/");
        assert_eq!(c.files_base(c.listen), "https://files.example.com/pool");
    }
}
