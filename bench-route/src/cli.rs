//! Command line, and what each mode prints and writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::json;

use crate::load::{self, Arrivals, Expect, RateOptions, Target};
use crate::server::{self, Spawned};
use crate::stats::{Cpu, CpuMeter, loadavg};

/// The smoke run's fleet (`examples/bench-routing-smoke.yaml`).
pub const SMOKE_CONFIG: &str = include_str!("../../examples/bench-routing-smoke.yaml");

/// Load generator for Refleet's router (Route / ListShards over gRPC, h2c).
#[derive(Debug, clap::Parser)]
#[command(name = "refleet-route-bench", version)]
pub struct Args {
    /// Router base URL (`http://127.0.0.1:7080/`: refleet up serves Route on its own port).
    #[arg(long, env = "REFLEET_ROUTE_BENCH_URL", conflicts_with = "spawn")]
    pub url: Option<String>,
    /// Start `PATH up --config CONFIG --listen 127.0.0.1:0` for the run and stop it after.
    /// `smoke` defaults to `refleet` next to this binary.
    #[arg(long, value_name = "PATH", env = "REFLEET_ROUTE_BENCH_SPAWN")]
    pub spawn: Option<PathBuf>,
    /// Fleet config for `--spawn` (see examples/bench-routing*.yaml).
    #[arg(long, value_name = "FILE", env = "REFLEET_ROUTE_BENCH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Run the spawned refleet up under `nice -n N`.
    #[arg(long, value_name = "N")]
    pub server_nice: Option<i32>,
    /// Pid of the router process (with `--url`) whose CPU to report.
    #[arg(long, env = "REFLEET_ROUTE_BENCH_SERVER_PID")]
    pub server_pid: Option<u32>,
    /// Write the full report as JSON to FILE.
    #[arg(long, value_name = "FILE", env = "REFLEET_ROUTE_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// HTTP/2 connections (default: rate 4, burst 50, open-time 1).
    #[arg(long, env = "REFLEET_ROUTE_BENCH_CONNECTIONS")]
    pub connections: Option<usize>,
    /// Tokio worker threads of the load generator. One by default: on a two-core machine
    /// shared with the router, a second thread mostly adds cross-thread wake-ups.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..), env = "REFLEET_ROUTE_BENCH_THREADS")]
    pub threads: u16,
    /// Namespace of the Session.
    #[arg(long, default_value = "default", env = "REFLEET_ROUTE_BENCH_NAMESPACE")]
    pub namespace: String,
    /// Preferred region sent with every call (empty: none).
    #[arg(long, default_value = "", env = "REFLEET_ROUTE_BENCH_REGION")]
    pub region: String,
    /// What to measure.
    #[command(subcommand)]
    pub mode: Mode,
}

/// The measurements.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Mode {
    /// A sustained rate of Route calls, open loop (see `--arrivals`).
    /// Fails (exit 1) when any call fails.
    Rate {
        /// Session name.
        #[arg(long, default_value = "lookup")]
        session: String,
        /// Offered Route calls per second.
        #[arg(long, default_value_t = 20_000.0)]
        rate: f64,
        /// Measured span.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Unmeasured span first, same load.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Calls in flight at most (`poisson`, `even`), or callers (`callers`).
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Distinct user ids the calls cycle through; a repeated user gets its pending
        /// reservation back instead of a new one. 0: anonymous calls, each reserves a place
        /// until its token expires.
        #[arg(long, default_value_t = 2_000)]
        users: u64,
        /// When calls are sent: `poisson` (independent clients: exponential gaps), `even`
        /// (1/rate apart), or `callers` (each of `--concurrency` callers on Tokio's
        /// millisecond timer, so calls leave in clumps at each tick).
        #[arg(long, value_enum, default_value_t = Arrivals::Callers)]
        arrivals: Arrivals,
        /// Seed of the Poisson schedule.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// CALLS Route calls for one session released at the same instant; then ListShards must
    /// show the expected shards and reservations. Fails on any error or mismatch.
    Burst {
        /// Session name.
        #[arg(long, default_value = "burst")]
        session: String,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 10_000)]
        calls: usize,
        /// Shards the session must have afterwards.
        #[arg(long)]
        expect_shards: Option<u32>,
        /// Reservations every shard must hold afterwards.
        #[arg(long)]
        expect_per_shard: Option<u32>,
    },
    /// SAMPLES times: fill the session's open shards to their threshold, then time the Route
    /// that finds no room (it waits for the new shard). Fails if a timed call fails or does
    /// not get a new shard.
    OpenTime {
        /// Session name.
        #[arg(long, default_value = "warm")]
        session: String,
        /// Threshold crossings to time.
        #[arg(long, default_value_t = 5)]
        samples: usize,
    },
    /// A short run of every mode against a refleet up started with the smoke config:
    /// fails on any error or wrong shard count.
    Smoke,
}

/// Runs the mode; `Ok(false)` when the run found errors.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    let smoke = matches!(args.mode, Mode::Smoke);
    let spawn = match (&args.spawn, &args.url) {
        (Some(p), _) => Some(p.clone()),
        (None, None) if smoke => Some(default_refleet()?),
        (None, None) => bail!("give --url URL (a running router) or --spawn PATH --config FILE"),
        (None, Some(_)) => None,
    };
    let mut spawned = None;
    let url = match spawn {
        Some(bin) => {
            let config = match (&args.config, smoke) {
                (Some(c), _) => c.clone(),
                (None, true) => {
                    let path = std::env::temp_dir().join(format!(
                        "refleet-route-bench-smoke-{}.yaml",
                        std::process::id()
                    ));
                    std::fs::write(&path, SMOKE_CONFIG)?;
                    path
                }
                (None, false) => bail!("--spawn needs --config FILE"),
            };
            let s = Spawned::start(&bin, &config, args.server_nice).await?;
            eprintln!(
                "refleet-route-bench: refleet up at {} (pid {}, logs in {})",
                s.url,
                s.pid,
                s.dir.display()
            );
            let url = s.url.clone();
            spawned = Some(s);
            if let Err(e) = server::wait_ready(&url, Duration::from_secs(60)).await {
                if let Some(s) = spawned {
                    s.stop(Duration::from_secs(10)).await;
                }
                return Err(e);
            }
            url
        }
        None => args.url.clone().unwrap_or_default(),
    };
    let server_pid = spawned.as_ref().map(|s| s.pid).or(args.server_pid);
    let result = measure(&args, &url, server_pid).await;
    if let Some(s) = spawned {
        s.stop(Duration::from_secs(20)).await;
    }
    result
}

fn default_refleet() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|d| d.join("refleet"))
        .context("no directory for this binary")?;
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build -p refleet-operator -p refleet-reflector) or pass --spawn PATH",
            path.display()
        );
    }
    Ok(path)
}

#[derive(Serialize)]
struct RunContext<'a> {
    mode: &'a str,
    url: &'a str,
    connections: usize,
    target: &'a Target,
    load_avg_1m_before: f64,
    load_avg_1m_after: f64,
    server_cpu: Option<Cpu>,
    bench_cpu: Option<Cpu>,
    unix_time: u64,
}

async fn measure(args: &Args, url: &str, server_pid: Option<u32>) -> anyhow::Result<bool> {
    let target = |session: &str| Target {
        namespace: args.namespace.clone(),
        session: session.to_owned(),
        region: args.region.clone(),
    };
    let smoke = matches!(args.mode, Mode::Smoke);
    let mut report = serde_json::Map::new();
    let mut good = true;
    let modes: Vec<Mode> = match &args.mode {
        Mode::Smoke => vec![
            Mode::Rate {
                session: "lookup".into(),
                rate: 300.0,
                duration: Duration::from_secs(1),
                warmup: Duration::ZERO,
                concurrency: 8,
                users: 50,
                arrivals: Arrivals::Poisson,
                seed: 1,
            },
            Mode::Burst {
                session: "burst".into(),
                calls: 200,
                expect_shards: Some(25),
                expect_per_shard: Some(8),
            },
            Mode::OpenTime {
                session: "warm".into(),
                samples: 2,
            },
        ],
        m => vec![m.clone()],
    };
    for mode in modes {
        let (name, default_conns) = match &mode {
            Mode::Rate { .. } => ("rate", 4),
            Mode::Burst { .. } => ("burst", 50),
            Mode::OpenTime { .. } => ("open-time", 1),
            Mode::Smoke => ("smoke", 1),
        };
        let conns = args.connections.unwrap_or(default_conns);
        let clients = load::connect(url, conns).await?;
        let load_before = loadavg();
        let server_cpu = CpuMeter::start(server_pid);
        let own_cpu = CpuMeter::start(None);
        let (t, result, ok) = match &mode {
            Mode::Rate {
                session,
                rate,
                duration,
                warmup,
                concurrency,
                users,
                arrivals,
                seed,
            } => {
                let t = target(session);
                let o = RateOptions {
                    rate: *rate,
                    duration: *duration,
                    warmup: *warmup,
                    concurrency: *concurrency,
                    users: *users,
                    arrivals: *arrivals,
                    seed: *seed,
                };
                let r = load::rate(&clients, &t, &o).await;
                println!(
                    "rate: session {:?}, offered {:.0}/s ({} arrivals) over {conns} connections, {} {}, users {}: achieved {:.0}/s, {} calls, {} OK",
                    t.session,
                    o.rate,
                    serde_json::to_value(o.arrivals)?.as_str().unwrap_or("?"),
                    o.concurrency,
                    if o.arrivals == Arrivals::Callers {
                        "callers"
                    } else {
                        "in flight at most"
                    },
                    o.users,
                    r.achieved_per_s,
                    r.calls,
                    r.ok
                );
                println!("  latency (from send):     {}", r.latency);
                println!("  latency (from schedule): {}", r.latency_from_schedule);
                println!(
                    "  send lag: {} ; sent > 5 ms late: {}",
                    r.send_lag, r.late_sends
                );
                println!("  errors: {}", r.errors);
                if !smoke {
                    println!(
                        "  target p99 ≤ 1 ms at 20 000/s: {}",
                        met(r.latency.p99_ms <= 1.0 && r.achieved_per_s >= 0.99 * 20_000.0)
                    );
                }
                let ok = r.errors.total() == 0;
                (t, json!({"options": o, "result": r}), ok)
            }
            Mode::Burst {
                session,
                calls,
                expect_shards,
                expect_per_shard,
            } => {
                let t = target(session);
                let expect = Expect {
                    shards: *expect_shards,
                    per_shard: *expect_per_shard,
                };
                let r = load::burst(&clients, &t, *calls, expect).await?;
                let reserved: u64 = r.listed.iter().map(|s| u64::from(s.reserved)).sum();
                let mut per: std::collections::BTreeMap<u32, u32> = Default::default();
                for s in &r.listed {
                    *per.entry(s.reserved).or_insert(0) += 1;
                }
                println!(
                    "burst: session {:?}, {} calls at once over {conns} connections: {} OK in {:.1} ms",
                    t.session, r.calls, r.ok, r.wall_ms
                );
                println!("  answer latency: {}", r.latency);
                println!(
                    "  ListShards: {} shards, {reserved} reserved; shards by reservations: {}",
                    r.listed.len(),
                    per.iter()
                        .map(|(k, v)| format!("{v} × {k}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!("  errors: {}", r.errors);
                if r.problems.is_empty() {
                    println!("  check: passed");
                } else {
                    for p in &r.problems {
                        println!("  check FAILED: {p}");
                    }
                }
                if !smoke {
                    println!("  target p99 < 100 ms: {}", met(r.latency.p99_ms < 100.0));
                }
                let ok = r.problems.is_empty();
                (
                    t,
                    json!({"calls": calls, "expect": expect, "result": r}),
                    ok,
                )
            }
            Mode::OpenTime { session, samples } => {
                let t = target(session);
                let r = load::open_time(&clients[0], &t, *samples).await?;
                println!(
                    "open-time: session {:?}, {} threshold crossings",
                    t.session,
                    r.samples.len()
                );
                for s in &r.samples {
                    println!(
                        "  {} shards, {} fill calls, then {:.1} ms → {} ({})",
                        s.shards_before,
                        s.fill_calls,
                        s.ms,
                        if s.shard.is_empty() { "-" } else { &s.shard },
                        s.error.as_deref().unwrap_or(if s.new_shard {
                            "new shard"
                        } else {
                            "NOT a new shard"
                        })
                    );
                }
                println!("  timed calls: {}", r.latency);
                println!("  fill calls:  {}", r.fill_latency);
                for p in &r.problems {
                    println!("  FAILED: {p}");
                }
                let ok = r.problems.is_empty();
                (t, json!({"samples": samples, "result": r}), ok)
            }
            Mode::Smoke => unreachable!("expanded above"),
        };
        let ctx = RunContext {
            mode: name,
            url,
            connections: conns,
            target: &t,
            load_avg_1m_before: load_before,
            load_avg_1m_after: loadavg(),
            server_cpu: server_cpu.stop(),
            bench_cpu: own_cpu.stop(),
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        println!(
            "  load average (1 min) before/after: {:.2} / {:.2}; router process CPU: {}; bench CPU: {}",
            ctx.load_avg_1m_before,
            ctx.load_avg_1m_after,
            cpu_text(ctx.server_cpu),
            cpu_text(ctx.bench_cpu)
        );
        good &= ok;
        report.insert(
            name.to_owned(),
            json!({"context": ctx, "run": result, "passed": ok}),
        );
    }
    if let Some(path) = &args.json {
        write_json(path, &serde_json::Value::Object(report))?;
    }
    Ok(good)
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn cpu_text(c: Option<Cpu>) -> String {
    c.map_or_else(
        || "n/a".to_owned(),
        |c| format!("{:.2} s ({:.2} cores)", c.cpu_s, c.cores),
    )
}

fn write_json(path: &Path, v: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
