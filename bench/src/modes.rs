//! The modes: fixed, ramp, idle, slow-consumer and smoke, each a sequence of load runs with
//! its own verdict, printed for people and written as JSON.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::cli::{
    Args, Front, IdleArgs, LoadArgs, Mode, RampArgs, SlowArgs, SmokeArgs, SoakArgs, TargetArgs,
};
use crate::idle::{self, IdleReport, IdleSpec};
use crate::load::{self, Endpoint, LoadReport, LoadSpec};
use crate::target::{Gateway, Target};

/// One ramp step.
#[derive(Debug, Clone, Serialize)]
pub struct RampStep {
    /// Step number (the offered rate is `start × factor^step`).
    pub step: usize,
    /// Attempt at this step (a failing step is retried `--retries` times).
    pub attempt: usize,
    /// Passed every criterion.
    pub passed: bool,
    /// Why it failed.
    pub why: Option<String>,
    pub run: LoadReport,
}

/// What a mode found.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Report {
    Fixed {
        run: LoadReport,
    },
    Smoke {
        run: LoadReport,
    },
    Ramp {
        p99_bound_ms: f64,
        /// Highest delivered rate of a passing step.
        best_delivered_per_s: Option<f64>,
        best: Option<LoadReport>,
        steps: Vec<RampStep>,
    },
    Idle {
        report: IdleReport,
    },
    HalfOpen {
        report: crate::half_open::HalfOpenReport,
    },
    SlowConsumer {
        /// Median p99 of the other clients without the stalled client, µs.
        median_p99_without_us: u64,
        /// Median p99 of the other clients with the stalled client, µs.
        median_p99_with_us: u64,
        /// Largest reflector RSS growth during a run with the stalled client, KiB.
        max_rss_growth_with_kib: Option<i64>,
        /// Largest reflector RSS growth during a run without it, KiB.
        max_rss_growth_without_kib: Option<i64>,
        without: Vec<LoadReport>,
        with: Vec<LoadReport>,
    },
}

impl Report {
    /// Whether the mode's verdict is a pass.
    pub fn passed(&self) -> bool {
        match self {
            Report::Fixed { run } | Report::Smoke { run } => run.is_clean(),
            Report::Ramp { best, .. } => best.is_some(),
            Report::Idle { report } => report.is_clean(),
            Report::HalfOpen { report } => report.passed(),
            Report::SlowConsumer { without, with, .. } => {
                without.iter().all(LoadReport::is_clean)
                    && with
                        .iter()
                        .all(|r| r.faults.is_clean() && r.complete && r.failed_clients == 0)
            }
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Report::Fixed { run } | Report::Smoke { run } => write!(f, "{run}"),
            Report::Ramp {
                p99_bound_ms,
                best_delivered_per_s,
                best,
                steps,
            } => {
                for s in steps {
                    writeln!(
                        f,
                        "step {} attempt {}: offered {:.0}/s, delivered {:.0}/s, p99 {:.3} ms: {}",
                        s.step,
                        s.attempt,
                        s.run.offered_deliveries_per_s,
                        s.run.delivered_per_s,
                        s.run.latency.p99_us as f64 / 1000.0,
                        if s.passed {
                            "pass".to_string()
                        } else {
                            format!("FAIL ({})", s.why.as_deref().unwrap_or("?"))
                        }
                    )?;
                }
                match (best_delivered_per_s, best) {
                    (Some(rate), Some(best)) => {
                        writeln!(
                            f,
                            "highest delivered rate holding p99 ≤ {p99_bound_ms} ms with no loss or reorder: {rate:.0} messages/s"
                        )?;
                        write!(f, "{best}")
                    }
                    _ => writeln!(f, "no step passed"),
                }
            }
            Report::Idle { report } => write!(f, "{report}"),
            Report::HalfOpen { report } => write!(f, "{report}"),
            Report::SlowConsumer {
                median_p99_without_us,
                median_p99_with_us,
                max_rss_growth_with_kib,
                max_rss_growth_without_kib,
                without,
                with,
            } => {
                for (a, b) in without.iter().zip(with) {
                    writeln!(
                        f,
                        "without: p99 {:.3} ms, clean {}, RSS growth {} KiB | with: p99 {:.3} ms, clean {}, RSS growth {} KiB, stalled client {}",
                        a.latency.p99_us as f64 / 1000.0,
                        a.is_clean(),
                        rss_growth(a).map_or("?".into(), |v| v.to_string()),
                        b.latency.p99_us as f64 / 1000.0,
                        b.faults.is_clean() && b.complete && b.failed_clients == 0,
                        rss_growth(b).map_or("?".into(), |v| v.to_string()),
                        b.stalled
                            .as_ref()
                            .and_then(|s| s.end.as_deref())
                            .unwrap_or("?"),
                    )?;
                }
                writeln!(
                    f,
                    "median p99 of the other clients: {:.3} ms without, {:.3} ms with the stalled client (difference {:+.3} ms)",
                    *median_p99_without_us as f64 / 1000.0,
                    *median_p99_with_us as f64 / 1000.0,
                    (*median_p99_with_us as f64 - *median_p99_without_us as f64) / 1000.0
                )?;
                writeln!(
                    f,
                    "largest reflector RSS growth in a run: {} KiB with, {} KiB without the stalled client",
                    max_rss_growth_with_kib.map_or("?".into(), |v| v.to_string()),
                    max_rss_growth_without_kib.map_or("?".into(), |v| v.to_string())
                )
            }
        }
    }
}

fn spec(l: &LoadArgs, read_buffer: usize) -> LoadSpec {
    LoadSpec {
        sessions: l.sessions,
        clients: l.clients,
        rate: l.rate,
        payload_bytes: l.payload_bytes,
        duration: l.duration,
        tick_ms: l.tick_ms,
        batch_interval: l.batch_interval,
        drain_timeout: l.drain_timeout,
        join_timeout: l.join_timeout,
        snapshot_every: l.snapshot_every,
        stall: false,
        read_buffer,
    }
}

/// Runs the mode the arguments ask for; prints the summary and writes the JSON.
pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let Args { target, json, mode } = args;
    let TargetArgs {
        url,
        spawn,
        reflector_args,
        reflector_pid,
        read_buffer,
        front,
        gateway_bin,
    } = target;
    if let Mode::Move(m) = &mode {
        let report = crate::moves::run(&crate::moves::MoveSpec {
            fleet: if m.fleet.ends_with('/') {
                m.fleet.clone()
            } else {
                format!("{}/", m.fleet)
            },
            namespace: m.namespace.clone(),
            sessions: m.sessions.clone(),
            clients: m.clients,
            rate: m.rate,
            duration: m.duration,
            move_after: m.move_after,
            drain: m.drain,
        })
        .await?;
        return finish(&report, report.passed(), json.as_deref());
    }
    if let Mode::Soak(s) = mode {
        let Some(bin) = spawn else {
            anyhow::bail!("the soak needs --spawn PATH (it stops and restarts the reflector)");
        };
        let report = crate::soak::run(&bin, &reflector_args, soak_spec(&s, read_buffer)).await?;
        return finish(&report, report.passed(), json.as_deref());
    }
    if matches!(mode, Mode::HalfOpen(_)) && front != Front::Gateway {
        anyhow::bail!("half-open measures the gateway: give --front gateway (and --spawn)");
    }
    let refleet = match (front, &spawn) {
        (Front::Direct, _) => None,
        (_, None) => anyhow::bail!(
            "--front gateway|both needs --spawn (the gateway is put in front of the spawned reflector)"
        ),
        (_, Some(bin)) => Some(gateway_bin.clone().unwrap_or_else(|| {
            std::path::Path::new(bin)
                .with_file_name("refleet")
                .display()
                .to_string()
        })),
    };
    let mut target = match (spawn, url) {
        (Some(bin), _) => Target::spawn(&bin, &reflector_args).await?,
        (None, Some(url)) => Target::external(&url, reflector_pid)?,
        (None, None) => anyhow::bail!("give --spawn PATH or --url URL"),
    };
    let result = run_fronts(&target, refleet.as_deref(), front, mode, read_buffer).await;
    target.stop().await;
    let (reports, ratios) = result?;
    let passed = reports.iter().all(|(_, r)| r.passed());
    if let [(_, report)] = reports.as_slice() {
        return finish(report, passed, json.as_deref());
    }
    for (front, report) in &reports {
        println!("== front: {front:?} ==\n{report}");
    }
    let both = serde_json::json!({
        "fronts": reports.iter().map(|(f, r)| serde_json::json!({"front": f, "report": r})).collect::<Vec<_>>(),
        "ratios": ratios,
    });
    if let Some(r) = &ratios {
        println!("{r}");
    }
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&both)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints a run's summary, writes its full report to `json` when given, and turns its
/// verdict into the exit status.
fn finish(
    report: &(impl std::fmt::Display + serde::Serialize),
    passed: bool,
    json: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    println!("{report}");
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `mode` through each front in turn (direct first) against the same reflector.
async fn run_fronts(
    target: &Target,
    refleet: Option<&str>,
    front: Front,
    mode: Mode,
    read_buffer: usize,
) -> anyhow::Result<(Vec<(Front, Report)>, Option<Ratios>)> {
    let mut reports = Vec::new();
    if matches!(front, Front::Direct | Front::Both) {
        let ep = Endpoint::resolve(&target.ws_base, target.proc()).await?;
        reports.push((
            Front::Direct,
            run_mode(&ep, mode.clone(), read_buffer).await?,
        ));
    }
    if let (Some(refleet), Front::Gateway | Front::Both) = (refleet, front) {
        let log_path = target.scratch.as_ref().map_or_else(
            || std::env::temp_dir().join("refleet-bench-gateway.log"),
            |d| d.join("gateway.log"),
        );
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut gateway = Gateway::spawn(refleet, &target.box_url(), log).await?;
        let result = async {
            let ep = Endpoint::resolve(&gateway.ws_base, gateway.proc()).await?;
            run_mode(&ep, mode, read_buffer).await
        }
        .await;
        gateway.stop().await;
        reports.push((Front::Gateway, result?));
    }
    let ratios = match reports.as_slice() {
        [(_, direct), (_, gateway)] => Ratios::of(direct, gateway),
        _ => None,
    };
    Ok((reports, ratios))
}

/// Gateway against direct, measured in one run.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Delivered messages/s through the gateway ÷ direct (a ramp: the best passing steps).
    pub throughput: Option<f64>,
    /// p50 latency through the gateway minus direct, ms.
    pub added_p50_ms: Option<f64>,
    /// p99 latency through the gateway and direct, ms.
    pub p99_ms: Option<(f64, f64)>,
    /// Gateway RSS per idle proxied connection at the last step, KiB (an idle run).
    pub gateway_rss_per_conn_kib: Option<f64>,
}

impl Ratios {
    fn of(direct: &Report, gateway: &Report) -> Option<Self> {
        let runs = |r: &Report| match r {
            Report::Fixed { run } | Report::Smoke { run } => Some(run.clone()),
            Report::Ramp { best, .. } => best.clone(),
            _ => None,
        };
        let ms = |us: u64| us as f64 / 1000.0;
        match (direct, gateway) {
            (_, Report::Idle { report }) => Some(Self {
                throughput: None,
                added_p50_ms: None,
                p99_ms: None,
                gateway_rss_per_conn_kib: report.steps.last().and_then(|s| s.rss_per_conn_kib),
            }),
            _ => {
                let (d, g) = (runs(direct)?, runs(gateway)?);
                Some(Self {
                    throughput: (d.delivered_per_s > 0.0)
                        .then(|| g.delivered_per_s / d.delivered_per_s),
                    added_p50_ms: Some(ms(g.latency.p50_us) - ms(d.latency.p50_us)),
                    p99_ms: Some((ms(g.latency.p99_us), ms(d.latency.p99_us))),
                    gateway_rss_per_conn_kib: None,
                })
            }
        }
    }
}

impl std::fmt::Display for Ratios {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "== gateway vs direct (same run) ==")?;
        if let Some(t) = self.throughput {
            writeln!(
                f,
                "throughput ratio (delivered/s, gateway ÷ direct): {t:.3}"
            )?;
        }
        if let Some(p) = self.added_p50_ms {
            writeln!(f, "added p50 latency: {p:+.3} ms")?;
        }
        if let Some((g, d)) = self.p99_ms {
            writeln!(f, "p99: {g:.3} ms through the gateway, {d:.3} ms direct")?;
        }
        if let Some(k) = self.gateway_rss_per_conn_kib {
            writeln!(f, "gateway RSS per idle proxied connection: {k:.1} KiB")?;
        }
        Ok(())
    }
}

/// Runs one mode against an endpoint.
pub async fn run_mode(ep: &Endpoint, mode: Mode, read_buffer: usize) -> anyhow::Result<Report> {
    let tag = crate::client::run_tag();
    Ok(match mode {
        Mode::Fixed(l) => Report::Fixed {
            run: load::run(ep, &tag, &spec(&l, read_buffer)).await?,
        },
        Mode::Smoke(SmokeArgs { duration }) => Report::Smoke {
            run: load::run(ep, &tag, &smoke_spec(duration, read_buffer)).await?,
        },
        Mode::Ramp(r) => ramp(ep, &tag, &r, read_buffer).await?,
        Mode::Idle(i) => Report::Idle {
            report: idle::run(ep, &tag, &idle_spec(&i, read_buffer)).await?,
        },
        Mode::SlowConsumer(s) => slow_consumer(ep, &tag, &s, read_buffer).await?,
        Mode::HalfOpen(h) => Report::HalfOpen {
            report: crate::half_open::run(
                ep,
                &crate::half_open::HalfOpenSpec {
                    connections: h.connections,
                    concurrency: h.concurrency,
                    settle: h.settle,
                    close_within: h.close_within,
                },
            )
            .await?,
        },
        Mode::Soak(_) => anyhow::bail!("the soak runs through `run` with --spawn"),
        Mode::Move(_) => anyhow::bail!("move mode runs through `run` with --fleet"),
    })
}

/// The smoke run: 2 sessions × 3 clients × 20 msg/s.
pub fn smoke_spec(duration: Duration, read_buffer: usize) -> LoadSpec {
    LoadSpec {
        sessions: 2,
        clients: 3,
        rate: 20.0,
        payload_bytes: 64,
        duration,
        tick_ms: 50,
        batch_interval: Duration::from_millis(5),
        drain_timeout: Duration::from_secs(5),
        join_timeout: Duration::from_secs(20),
        snapshot_every: 20,
        stall: false,
        read_buffer,
    }
}

fn soak_spec(s: &SoakArgs, read_buffer: usize) -> crate::soak::SoakSpec {
    crate::soak::SoakSpec {
        connections: s.connections.max(1),
        sessions: s.sessions.max(1),
        duration: s.duration,
        warmup: s.warmup,
        life_min: s.life_min,
        life_max: s.life_max,
        rate: s.rate,
        abrupt_pct: s.abrupt_pct,
        slow_readers: s.slow_readers,
        slow_rate: s.slow_rate,
        slow_stall: s.slow_stall,
        snap_every: s.snap_every,
        save_pct: s.save_pct,
        tick_ms: s.tick_ms,
        sample_every: s.sample_every,
        drain_timeout: s.drain_timeout,
        seed: s.seed,
        read_buffer,
        max_rss_growth_pct: s.max_rss_growth_pct,
        max_fd_growth_pct: s.max_fd_growth_pct,
    }
}

fn idle_spec(i: &IdleArgs, read_buffer: usize) -> IdleSpec {
    IdleSpec {
        steps: i.connections.clone(),
        per_session: i.per_session,
        tick_ms: i.tick_ms,
        settle: i.settle,
        measure: i.measure,
        sample: i.sample,
        per_source: i.per_source,
        concurrency: i.concurrency.max(1),
        join_timeout: i.join_timeout,
        read_buffer,
    }
}

async fn ramp(
    ep: &Endpoint,
    tag: &str,
    r: &RampArgs,
    read_buffer: usize,
) -> anyhow::Result<Report> {
    let mut base = spec(&r.load, read_buffer);
    let per_delivery = (base.sessions * base.clients * base.clients) as f64;
    let mut steps: Vec<RampStep> = Vec::new();
    let mut best: Option<LoadReport> = None;
    let mut offered = r.start;
    'steps: for step in 0..r.max_steps {
        base.rate = offered / per_delivery;
        for attempt in 0..=r.retries {
            let run = load::run(ep, &format!("{tag}-r{step}a{attempt}"), &base).await?;
            let why = verdict(&run, r.p99_bound_ms);
            eprintln!(
                "step {step} attempt {attempt}: offered {:.0}/s delivered {:.0}/s p99 {:.3} ms {}",
                run.offered_deliveries_per_s,
                run.delivered_per_s,
                run.latency.p99_us as f64 / 1000.0,
                why.as_deref().unwrap_or("pass")
            );
            let passed = why.is_none();
            steps.push(RampStep {
                step,
                attempt,
                passed,
                why,
                run: run.clone(),
            });
            tokio::time::sleep(Duration::from_secs(1)).await;
            if passed {
                if best
                    .as_ref()
                    .is_none_or(|b| run.delivered_per_s > b.delivered_per_s)
                {
                    best = Some(run);
                }
                offered *= r.factor;
                continue 'steps;
            }
        }
        break;
    }
    Ok(Report::Ramp {
        p99_bound_ms: r.p99_bound_ms,
        best_delivered_per_s: best.as_ref().map(|b| b.delivered_per_s),
        best,
        steps,
    })
}

/// Reflector RSS growth during a run (highest sample minus the start), KiB.
fn rss_growth(r: &LoadReport) -> Option<i64> {
    let start = r.reflector.as_ref()?.rss_start_kib as i64;
    Some(r.reflector_rss_max_kib? as i64 - start)
}

/// Why a ramp step fails, or `None` when it passes.
pub fn verdict(run: &LoadReport, p99_bound_ms: f64) -> Option<String> {
    if !run.faults.is_clean() {
        return Some(format!("integrity: {:?}", run.faults));
    }
    if run.failed_clients > 0 {
        return Some(format!(
            "{} clients cut off (close codes {:?})",
            run.failed_clients, run.close_codes
        ));
    }
    if !run.complete {
        return Some("not every message delivered within the drain timeout".to_string());
    }
    if run.latency.p99_us as f64 > p99_bound_ms * 1000.0 {
        return Some(format!(
            "p99 {:.3} ms over {p99_bound_ms} ms",
            run.latency.p99_us as f64 / 1000.0
        ));
    }
    if run.delivered_per_s < 0.9 * run.offered_deliveries_per_s {
        return Some("under 90 % of the offered rate delivered".to_string());
    }
    None
}

async fn slow_consumer(
    ep: &Endpoint,
    tag: &str,
    s: &SlowArgs,
    read_buffer: usize,
) -> anyhow::Result<Report> {
    let mut base = spec(&s.load, read_buffer);
    let mut without = Vec::new();
    let mut with = Vec::new();
    for i in 0..s.runs.max(1) {
        base.stall = false;
        without.push(load::run(ep, &format!("{tag}-n{i}"), &base).await?);
        tokio::time::sleep(Duration::from_secs(1)).await;
        base.stall = true;
        with.push(load::run(ep, &format!("{tag}-y{i}"), &base).await?);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let median = |v: &[LoadReport]| {
        let mut p: Vec<u64> = v.iter().map(|r| r.latency.p99_us).collect();
        p.sort_unstable();
        p[p.len() / 2]
    };
    let growth = |v: &[LoadReport]| v.iter().filter_map(rss_growth).max();
    Ok(Report::SlowConsumer {
        median_p99_without_us: median(&without),
        median_p99_with_us: median(&with),
        max_rss_growth_with_kib: growth(&with),
        max_rss_growth_without_kib: growth(&without),
        without,
        with,
    })
}
