//! Command-line flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Refleet's load generator: drives a reflector over WebSockets exactly as the Multisynq
/// client does (JOIN, SYNC, users, SEND, RECV, TICK) and measures delivery latency,
/// integrity (loss, duplication, reorder, seq continuity) and the reflector's CPU and memory.
///
/// Give either `--spawn PATH` (the bench starts the reflector on 127.0.0.1 with a scratch
/// storage directory and stops it at the end) or `--url` of a running reflector (add
/// `--reflector-pid` to measure its CPU and memory). Only loopback addresses are accepted.
#[derive(Debug, Parser)]
#[command(name = "refleet-bench", version)]
pub struct Args {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Also write the report as JSON to this file.
    #[arg(long, env = "REFLEET_BENCH_JSON", global = true)]
    pub json: Option<PathBuf>,
    #[command(subcommand)]
    pub mode: Mode,
}

/// Which reflector to load.
#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// WebSocket base of a running reflector (`ws://127.0.0.1:7070/reflector/`) or its box
    /// URL (`http://127.0.0.1:7070/`).
    #[arg(long, env = "REFLEET_BENCH_URL", global = true)]
    pub url: Option<String>,
    /// Start this `refleet-reflector` binary for the run (listening on 127.0.0.1, port 0).
    #[arg(
        long,
        env = "REFLEET_BENCH_SPAWN",
        global = true,
        conflicts_with = "url"
    )]
    pub spawn: Option<String>,
    /// Extra arguments for the spawned reflector, space-separated or repeated
    /// (e.g. `--reflector-args "--rate-limit 1000000 --rate-burst 1000000"`).
    #[arg(
        long,
        env = "REFLEET_BENCH_REFLECTOR_ARGS",
        global = true,
        allow_hyphen_values = true,
        value_delimiter = ' '
    )]
    pub reflector_args: Vec<String>,
    /// Pid of the reflector given with `--url`, to read its CPU time and RSS from /proc.
    #[arg(long, env = "REFLEET_BENCH_REFLECTOR_PID", global = true)]
    pub reflector_pid: Option<u32>,
    /// Where clients connect: `direct` (the reflector itself), `gateway` (through a
    /// `refleet gateway` the bench starts in front of the spawned reflector, every shard
    /// placed on it), or `both` (the same mode twice against the same reflector, direct then
    /// through the gateway, and the gateway/direct ratios). In gateway runs the CPU and RSS
    /// figures are the gateway process's. `gateway` and `both` need `--spawn`.
    #[arg(long, env = "REFLEET_BENCH_FRONT", global = true, value_enum, default_value_t = Front::Direct)]
    pub front: Front,
    /// The `refleet` binary that runs the gateway for `--front gateway|both`. Default:
    /// `refleet` next to the `--spawn` binary.
    #[arg(long, env = "REFLEET_BENCH_GATEWAY_BIN", global = true)]
    pub gateway_bin: Option<String>,
    /// WebSocket read buffer per client connection, bytes.
    #[arg(long, env = "REFLEET_BENCH_READ_BUFFER", global = true, default_value_t = 16 * 1024)]
    pub read_buffer: usize,
}

/// Where the bench's clients connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Front {
    /// The reflector itself.
    Direct,
    /// A `refleet gateway` in front of it.
    Gateway,
    /// Direct, then through the gateway, and the ratios.
    Both,
}

/// What to measure.
#[derive(Debug, Clone, Subcommand)]
pub enum Mode {
    /// A constant load: every client sends `--rate` messages per second.
    Fixed(LoadArgs),
    /// Raise the load step by step until a step fails (p99 above the bound, any loss,
    /// duplication or reorder, a client cut off, or under 90 % of the offered rate
    /// delivered); report the last passing step.
    Ramp(RampArgs),
    /// Many joined, idle connections: the reflector's RSS per connection and tick lateness.
    Idle(IdleArgs),
    /// One client of session 0 stops reading while the others send; alternates runs with
    /// and without it and compares the others' p99 and the reflector's RSS.
    SlowConsumer(SlowArgs),
    /// A short, small run that exits non-zero on any loss, duplication or reorder.
    Smoke(SmokeArgs),
    /// A compressed day: connections churning (joins, polite leaves, abrupt disconnects, slow
    /// readers, SNAP, SAVE) while the reflector's RSS and descriptors are sampled; then a
    /// SIGTERM drain, a restart on the same storage and a resume check of every session.
    /// Needs `--spawn`.
    Soak(SoakArgs),
    /// Live shard moves under load, against a running `refleet up` with the gateway and
    /// moves on: clients route and join through the gateway and send; after `--move-after`
    /// every shard is asked to move; reports each client's gap and any loss, duplicate,
    /// reorder or reboot. Needs `--fleet`, not `--spawn`/`--url`.
    Move(MoveArgs),
    /// Half-open upgrades against the gateway (needs `--front gateway`): `--connections`
    /// connections send the start of an upgrade head and never finish it; reports the
    /// gateway's RSS per such connection, whether a real upgrade still gets through while
    /// they hang, and whether the gateway closes every one at its header timeout.
    HalfOpen(HalfOpenArgs),
}

/// Arguments of the half-open mode.
#[derive(Debug, Clone, clap::Args)]
pub struct HalfOpenArgs {
    /// Half-open connections held at once.
    #[arg(long, env = "REFLEET_BENCH_CONNECTIONS", default_value_t = 10_000)]
    pub connections: usize,
    /// Connections opened concurrently while building the crowd.
    #[arg(long, env = "REFLEET_BENCH_CONCURRENCY", default_value_t = 256)]
    pub concurrency: usize,
    /// Pause after the crowd is up (and after it is closed) before RSS is read.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// How long the gateway may take to close them all: its header timeout (10 s by
    /// default) plus slack.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub close_within: Duration,
}

/// Move settings.
#[derive(Debug, Clone, clap::Args)]
pub struct MoveArgs {
    /// refleet up's URL (the `refleet:` line it prints), e.g. http://127.0.0.1:7080/.
    #[arg(long, env = "REFLEET_BENCH_FLEET")]
    pub fleet: String,
    /// Namespace of the Sessions.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Session names, comma-separated; each has one shard that moves.
    #[arg(long, value_delimiter = ',', default_value = "lobby")]
    pub sessions: Vec<String>,
    /// Clients per session.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// SENDs per second per client.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// How long clients send.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// When, after sending starts, the moves are asked for.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub move_after: Duration,
    /// How long to wait for the last deliveries after sending stops.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
}

/// The shape of the load.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Sessions.
    #[arg(long, env = "REFLEET_BENCH_SESSIONS", default_value_t = 20)]
    pub sessions: usize,
    /// Clients per session.
    #[arg(long, env = "REFLEET_BENCH_CLIENTS", default_value_t = 10)]
    pub clients: usize,
    /// SENDs per second per client (each is delivered to every client of its session).
    #[arg(long, env = "REFLEET_BENCH_RATE", default_value_t = 5.0)]
    pub rate: f64,
    /// Payload size in bytes (at least 41: the bench's stamp).
    #[arg(long, env = "REFLEET_BENCH_PAYLOAD_BYTES", default_value_t = 64)]
    pub payload_bytes: usize,
    /// How long clients send (per run or ramp step).
    #[arg(long, env = "REFLEET_BENCH_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Tick interval the clients ask for at JOIN, ms.
    #[arg(long, env = "REFLEET_BENCH_TICK_MS", default_value_t = 50)]
    pub tick_ms: u32,
    /// Shortest pause between two send batches of one client (feed, then one flush).
    #[arg(long, env = "REFLEET_BENCH_BATCH_INTERVAL", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub batch_interval: Duration,
    /// How long to wait for the last deliveries after sending stops.
    #[arg(long, env = "REFLEET_BENCH_DRAIN_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// How long all clients may take to join.
    #[arg(long, env = "REFLEET_BENCH_JOIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub join_timeout: Duration,
    /// Each session's first client announces a snapshot (SNAP) every this many RECVs and on
    /// REQU, so the reflector trims its message buffer as with real clients (0: never).
    #[arg(long, env = "REFLEET_BENCH_SNAPSHOT_EVERY", default_value_t = 20_000)]
    pub snapshot_every: u64,
}

/// Ramp settings.
#[derive(Debug, Clone, clap::Args)]
pub struct RampArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Deliveries per second of the first step (`--rate` is derived from it per step).
    #[arg(long, env = "REFLEET_BENCH_START", default_value_t = 20_000.0)]
    pub start: f64,
    /// Each step offers this many times the previous one.
    #[arg(long, env = "REFLEET_BENCH_FACTOR", default_value_t = 1.25)]
    pub factor: f64,
    /// Most steps.
    #[arg(long, env = "REFLEET_BENCH_MAX_STEPS", default_value_t = 30)]
    pub max_steps: usize,
    /// p99 latency a step must hold, ms.
    #[arg(long, env = "REFLEET_BENCH_P99_BOUND_MS", default_value_t = 50.0)]
    pub p99_bound_ms: f64,
    /// A failing step is run this many more times before the ramp stops (noisy machines).
    #[arg(long, env = "REFLEET_BENCH_RETRIES", default_value_t = 1)]
    pub retries: usize,
}

/// Idle settings.
#[derive(Debug, Clone, clap::Args)]
pub struct IdleArgs {
    /// Total connections after each step, comma-separated and ascending.
    #[arg(
        long,
        env = "REFLEET_BENCH_CONNECTIONS",
        value_delimiter = ',',
        default_value = "1000,2000,3000"
    )]
    pub connections: Vec<usize>,
    /// Clients per session.
    #[arg(long, env = "REFLEET_BENCH_PER_SESSION", default_value_t = 10)]
    pub per_session: usize,
    /// Tick interval the clients ask for at JOIN, ms.
    #[arg(long, env = "REFLEET_BENCH_TICK_MS", default_value_t = 50)]
    pub tick_ms: u32,
    /// Pause after a step's connections joined, before RSS is read.
    #[arg(long, env = "REFLEET_BENCH_SETTLE", default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Tick-lateness window per step.
    #[arg(long, env = "REFLEET_BENCH_MEASURE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub measure: Duration,
    /// Clients whose ticks are timed.
    #[arg(long, env = "REFLEET_BENCH_SAMPLE", default_value_t = 50)]
    pub sample: usize,
    /// Connections per source address 127.0.0.x (loopback has ~28 000 ports per address).
    #[arg(long, env = "REFLEET_BENCH_PER_SOURCE", default_value_t = 20_000)]
    pub per_source: usize,
    /// WebSocket handshakes in flight at once.
    #[arg(long, env = "REFLEET_BENCH_CONCURRENCY", default_value_t = 64)]
    pub concurrency: usize,
    /// How long one step's joins may take.
    #[arg(long, env = "REFLEET_BENCH_JOIN_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub join_timeout: Duration,
}

/// Slow-consumer settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SlowArgs {
    #[command(flatten)]
    pub load: LoadArgs,
    /// Pairs of runs (one without, one with the stalled client, alternating).
    #[arg(long, env = "REFLEET_BENCH_RUNS", default_value_t = 5)]
    pub runs: usize,
}

/// Smoke settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SmokeArgs {
    /// How long clients send.
    #[arg(long, env = "REFLEET_BENCH_DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// Soak settings.
#[derive(Debug, Clone, clap::Args)]
pub struct SoakArgs {
    /// Connections kept open at once (each slot reconnects when its connection ends).
    #[arg(long, env = "REFLEET_BENCH_CONNECTIONS", default_value_t = 2000)]
    pub connections: usize,
    /// Sessions (slot i joins session i % sessions).
    #[arg(long, env = "REFLEET_BENCH_SESSIONS", default_value_t = 200)]
    pub sessions: usize,
    /// How long connections churn.
    #[arg(long, env = "REFLEET_BENCH_DURATION", default_value = "12m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Samples before this are not used for the growth slopes.
    #[arg(long, env = "REFLEET_BENCH_WARMUP", default_value = "3m", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Shortest life of a connection.
    #[arg(long, env = "REFLEET_BENCH_LIFE_MIN", default_value = "5s", value_parser = humantime::parse_duration)]
    pub life_min: Duration,
    /// Longest life of a connection.
    #[arg(long, env = "REFLEET_BENCH_LIFE_MAX", default_value = "25s", value_parser = humantime::parse_duration)]
    pub life_max: Duration,
    /// SENDs per second of each well-behaved connection.
    #[arg(long, env = "REFLEET_BENCH_RATE", default_value_t = 0.5)]
    pub rate: f64,
    /// Percentage of connections that drop TCP without a close frame at the end of their life.
    #[arg(long, env = "REFLEET_BENCH_ABRUPT_PCT", default_value_t = 5.0)]
    pub abrupt_pct: f64,
    /// Slots whose connections stop reading (and keep sending) until the reflector cuts them.
    #[arg(long, env = "REFLEET_BENCH_SLOW_READERS", default_value_t = 4)]
    pub slow_readers: usize,
    /// SENDs per second of a slow reader while it does not read.
    #[arg(long, env = "REFLEET_BENCH_SLOW_RATE", default_value_t = 100.0)]
    pub slow_rate: f64,
    /// Longest stall of a slow reader.
    #[arg(long, env = "REFLEET_BENCH_SLOW_STALL", default_value = "60s", value_parser = humantime::parse_duration)]
    pub slow_stall: Duration,
    /// Each connection announces a snapshot (SNAP) every this many RECVs, and on REQU.
    #[arg(long, env = "REFLEET_BENCH_SNAP_EVERY", default_value_t = 100)]
    pub snap_every: u64,
    /// Percentage of connections that send a SAVE after joining.
    #[arg(long, env = "REFLEET_BENCH_SAVE_PCT", default_value_t = 10.0)]
    pub save_pct: f64,
    /// Tick interval asked for at JOIN, ms.
    #[arg(long, env = "REFLEET_BENCH_TICK_MS", default_value_t = 1000)]
    pub tick_ms: u32,
    /// RSS and descriptor sampling period.
    #[arg(long, env = "REFLEET_BENCH_SAMPLE_EVERY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub sample_every: Duration,
    /// The reflector's --drain-timeout.
    #[arg(long, env = "REFLEET_BENCH_DRAIN", default_value = "5s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Seed of the churn (which connections are abrupt, lives, SAVEs).
    #[arg(long, env = "REFLEET_BENCH_SEED", default_value_t = 15)]
    pub seed: u64,
    /// RSS growth allowed over the post-warm-up window (least-squares line), % of its mean.
    #[arg(long, env = "REFLEET_BENCH_MAX_RSS_GROWTH_PCT", default_value_t = 5.0)]
    pub max_rss_growth_pct: f64,
    /// Descriptor growth allowed over the post-warm-up window, % of its mean.
    #[arg(long, env = "REFLEET_BENCH_MAX_FD_GROWTH_PCT", default_value_t = 2.0)]
    pub max_fd_growth_pct: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_flags_are_consistent() {
        Args::command().debug_assert();
    }
}
