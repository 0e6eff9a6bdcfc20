//! The soak: a compressed day of churn against one spawned reflector, then a drain, a
//! restart on the same storage and a resume check of every session.
//!
//! `--connections` slots each run one connection after another to a fixed session
//! (`slot % --sessions`). A connection joins, sends `--rate` messages per second for a random
//! life between `--life-min` and `--life-max`, then leaves: most close politely after their
//! own last message came back; `--abrupt-pct` of them drop the TCP connection without a close
//! frame; `--slow-readers` slots stop reading while sending fast, until the reflector cuts
//! them off. Connections announce snapshots (SNAP, every `--snap-every` RECVs and on REQU)
//! and some persist data (SAVE), with URLs under the reflector's files base and the
//! session's own prefix.
//!
//! Well-behaved connections check what they receive: every RECV carries the seq after the
//! previous one (from the SYNC on), every sender's messages arrive with consecutive counters
//! once the first one was seen, and every message a connection sent comes back to it. The
//! reflector's RSS and open descriptors are sampled every `--sample-every`; after `--warmup`
//! a least-squares line through the samples gives the growth per minute.
//!
//! At the end the remaining connections stop sending, the reflector gets SIGTERM (it drains
//! and stores every session), a new reflector starts on the same storage and port, and one
//! client per session JOINs: it must get the same timeline, at or after the last seq seen.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::client;
use crate::wire::{self, Frame, Payload, Stamp, seq_after};

/// What the soak does; see the module docs.
#[derive(Debug, Clone)]
pub struct SoakSpec {
    pub connections: usize,
    pub sessions: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub life_min: Duration,
    pub life_max: Duration,
    pub rate: f64,
    pub abrupt_pct: f64,
    pub slow_readers: usize,
    pub slow_rate: f64,
    pub slow_stall: Duration,
    pub snap_every: u64,
    pub save_pct: f64,
    pub tick_ms: u32,
    pub sample_every: Duration,
    pub drain_timeout: Duration,
    pub seed: u64,
    pub read_buffer: usize,
    /// RSS growth over the post-warm-up window allowed, % of its mean.
    pub max_rss_growth_pct: f64,
    /// Descriptor growth over the post-warm-up window allowed, % of its mean.
    pub max_fd_growth_pct: f64,
}

/// Least-squares slope of `y` over `x`; `None` with fewer than two distinct `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    Some(sxy / sxx)
}

/// A small deterministic generator (splitmix64), so a seed replays the same churn.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform between `a` and `b`.
    pub fn between(&mut self, a: Duration, b: Duration) -> Duration {
        if b <= a {
            return a;
        }
        a + (b - a).mul_f64(self.unit())
    }
}

/// One reading of the reflector.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ProcPoint {
    /// Seconds since the soak started.
    pub t_s: f64,
    pub rss_kib: u64,
    pub fds: u64,
    /// Connections of the bench open at that moment.
    pub live: u64,
}

/// Counters every connection adds to.
#[derive(Debug, Default)]
struct Counters {
    opened: AtomicU64,
    joined: AtomicU64,
    join_failed: AtomicU64,
    polite: AtomicU64,
    abrupt: AtomicU64,
    slow: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    recvs: AtomicU64,
    lost: AtomicU64,
    own_lost: AtomicU64,
    reordered: AtomicU64,
    seq_gaps: AtomicU64,
    seq_backwards: AtomicU64,
    snaps: AtomicU64,
    saves: AtomicU64,
    live: AtomicU64,
    /// Well-behaved connections that ended some other way than planned.
    unplanned: AtomicU64,
}

/// What a session looked like to its clients.
#[derive(Debug, Default, Clone)]
struct SessionSeen {
    timeline: Option<String>,
    timeline_changes: u64,
    last_seq: Option<u32>,
}

struct Ctx {
    spec: SoakSpec,
    ws_base: String,
    files_base: String,
    server: SocketAddr,
    sids: Vec<String>,
    c: Counters,
    sessions: Mutex<Vec<SessionSeen>>,
    /// `kind:end` → count (e.g. `polite:closed 1000`, `slow:closed 4001`).
    ends: Mutex<BTreeMap<String, u64>>,
    /// Stop starting connections, stop sending, stay connected for the drain.
    finishing: AtomicBool,
    next_id: AtomicU64,
    base: Instant,
}

impl Ctx {
    fn end(&self, key: String) {
        if let Ok(mut m) = self.ends.lock() {
            *m.entry(key).or_insert(0) += 1;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Polite,
    Abrupt,
    Slow,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Polite => "polite",
            Kind::Abrupt => "abrupt",
            Kind::Slow => "slow",
        }
    }
}

/// The result of a resume check of one session.
#[derive(Debug, Clone, Serialize)]
pub struct Resumed {
    pub session: String,
    pub ok: bool,
    pub detail: String,
}

/// What the soak found.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub connections: usize,
    pub sessions: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub seed: u64,
    pub reflector_args: Vec<String>,
    pub rss_slope_kib_per_min: Option<f64>,
    pub fd_slope_per_min: Option<f64>,
    pub rss_mean_after_warmup_kib: f64,
    pub fds_mean_after_warmup: f64,
    pub rss_growth_over_window_pct: Option<f64>,
    pub fd_growth_over_window_pct: Option<f64>,
    pub rss_peak_kib: u64,
    pub fds_peak: u64,
    pub connections_opened: u64,
    pub joined: u64,
    pub join_failed: u64,
    pub polite_leaves: u64,
    pub abrupt_disconnects: u64,
    pub slow_reader_connections: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub recvs: u64,
    pub lost: u64,
    pub own_lost: u64,
    pub reordered_or_duplicated: u64,
    pub seq_gaps: u64,
    pub seq_backwards: u64,
    pub unplanned_ends: u64,
    pub snaps_sent: u64,
    pub saves_sent: u64,
    pub ends: BTreeMap<String, u64>,
    pub timeline_changes: u64,
    pub metrics_before_drain: BTreeMap<String, f64>,
    pub drain_exit: String,
    pub drain_s: f64,
    pub sessions_stored: usize,
    pub sessions_resumed: usize,
    pub resume: Vec<Resumed>,
    pub failures: Vec<String>,
    pub samples: Vec<ProcPoint>,
}

impl SoakReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("?".into(), |v| format!("{v:.digits$}"))
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "# Soak: {} connections, {} sessions, {:.0} s (warm-up {:.0} s), seed {}\n",
            self.connections, self.sessions, self.duration_s, self.warmup_s, self.seed
        )?;
        writeln!(f, "reflector args: `{}`\n", self.reflector_args.join(" "))?;
        writeln!(f, "| measure | value |\n|---|---|")?;
        writeln!(
            f,
            "| RSS slope after warm-up | {} KiB/min (mean {:.0} KiB; {} % over the window) |",
            fmt_opt(self.rss_slope_kib_per_min, 1),
            self.rss_mean_after_warmup_kib,
            fmt_opt(self.rss_growth_over_window_pct, 2)
        )?;
        writeln!(
            f,
            "| fd slope after warm-up | {} fds/min (mean {:.0}; {} % over the window) |",
            fmt_opt(self.fd_slope_per_min, 2),
            self.fds_mean_after_warmup,
            fmt_opt(self.fd_growth_over_window_pct, 2)
        )?;
        writeln!(
            f,
            "| peak RSS / fds | {} KiB / {} |",
            self.rss_peak_kib, self.fds_peak
        )?;
        writeln!(
            f,
            "| connections opened / joined / join failed | {} / {} / {} |",
            self.connections_opened, self.joined, self.join_failed
        )?;
        writeln!(
            f,
            "| polite leaves / abrupt disconnects / slow-reader connections | {} / {} / {} |",
            self.polite_leaves, self.abrupt_disconnects, self.slow_reader_connections
        )?;
        writeln!(
            f,
            "| messages sent / bench messages received / RECVs checked | {} / {} / {} |",
            self.messages_sent, self.messages_received, self.recvs
        )?;
        writeln!(
            f,
            "| well-behaved: lost / own not echoed / reordered or duplicated / seq gaps / seq backwards | {} / {} / {} / {} / {} |",
            self.lost,
            self.own_lost,
            self.reordered_or_duplicated,
            self.seq_gaps,
            self.seq_backwards
        )?;
        writeln!(
            f,
            "| well-behaved connections ended unplanned | {} |",
            self.unplanned_ends
        )?;
        writeln!(
            f,
            "| SNAPs / SAVEs sent | {} / {} |",
            self.snaps_sent, self.saves_sent
        )?;
        writeln!(
            f,
            "| timeline changes seen during the run | {} |",
            self.timeline_changes
        )?;
        writeln!(
            f,
            "| drain | {} in {:.1} s |",
            self.drain_exit, self.drain_s
        )?;
        writeln!(
            f,
            "| sessions stored / resumed | {} / {} of {} |",
            self.sessions_stored, self.sessions_resumed, self.sessions
        )?;
        writeln!(
            f,
            "\n## How connections ended\n\n| kind:end | count |\n|---|---|"
        )?;
        for (k, v) in &self.ends {
            writeln!(f, "| {k} | {v} |")?;
        }
        writeln!(
            f,
            "\n## Reflector metrics before the drain\n\n| metric | value |\n|---|---|"
        )?;
        for (k, v) in &self.metrics_before_drain {
            writeln!(f, "| `{k}` | {v} |")?;
        }
        let bad: Vec<&Resumed> = self.resume.iter().filter(|r| !r.ok).take(10).collect();
        if !bad.is_empty() {
            writeln!(f, "\n## Sessions not resumed (first 10)\n")?;
            for r in bad {
                writeln!(f, "- {}: {}", r.session, r.detail)?;
            }
        }
        writeln!(
            f,
            "\n**verdict: {}**",
            if self.passed() { "PASS" } else { "FAIL" }
        )?;
        for x in &self.failures {
            writeln!(f, "- {x}")?;
        }
        Ok(())
    }
}

/// A reflector the soak started and can stop with SIGTERM.
struct Reflector {
    child: Child,
    pid: u32,
    box_url: String,
}

async fn start_reflector(
    binary: &str,
    listen: &str,
    storage: &std::path::Path,
    log: &std::path::Path,
    extra: &[String],
) -> anyhow::Result<Reflector> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .context("opening the reflector log")?;
    let (child, box_url) = crate::target::start(binary, listen, storage, log, extra).await?;
    let pid = child.id().context("reflector pid")?;
    Ok(Reflector {
        child,
        pid,
        box_url,
    })
}

impl Reflector {
    /// SIGTERM, then wait for the exit; returns how it ended.
    async fn terminate(&mut self, wait: Duration) -> String {
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if !matches!(sent, Ok(s) if s.success()) {
            let _ = self.child.start_kill();
            return "SIGTERM could not be sent; killed".to_string();
        }
        match tokio::time::timeout(wait, self.child.wait()).await {
            Ok(Ok(status)) => format!("exited ({status})"),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => {
                let _ = self.child.start_kill();
                format!("still running {wait:?} after SIGTERM; killed")
            }
        }
    }
}

fn proc_point(pid: u32, t_s: f64, live: u64) -> Option<ProcPoint> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = crate::procstat::status_kib(&status, "VmRSS:")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(ProcPoint {
        t_s,
        rss_kib,
        fds,
        live,
    })
}

/// GET /metrics over a plain socket; keeps the reflector counters that tell about refusals,
/// cuts, snapshots, persistence and session state.
async fn metrics(box_url: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Some(hostport) = box_url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
    else {
        return out;
    };
    let fetch = async {
        let mut s = TcpStream::connect(hostport).await.ok()?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let Ok(Some(body)) = tokio::time::timeout(Duration::from_secs(10), fetch).await else {
        return out;
    };
    const KEEP: &[&str] = &[
        "refleet_reflector_closes_total",
        "refleet_reflector_slow_client_disconnects_total",
        "refleet_reflector_send_queue_drops_total",
        "refleet_reflector_snapshots_total",
        "refleet_reflector_persistence_operations_total",
        "refleet_reflector_stored_url_refusals_total",
        "refleet_reflector_session_state_operations_total",
        "refleet_reflector_join_refusals_total",
        "refleet_reflector_joins_total",
        "refleet_reflector_leaves_total",
        "refleet_reflector_deliveries_total",
        "refleet_reflector_session_ends_total",
    ];
    for line in body.lines() {
        if line.starts_with('#') || !KEEP.iter().any(|k| line.starts_with(k)) {
            continue;
        }
        if let Some((k, v)) = line.rsplit_once(' ')
            && let Ok(v) = v.parse::<f64>()
        {
            out.insert(k.to_string(), v);
        }
    }
    out
}

/// Runs the soak against `binary`; `extra` are more reflector flags.
pub async fn run(binary: &str, extra: &[String], spec: SoakSpec) -> anyhow::Result<SoakReport> {
    let scratch = crate::target::scratch_dir("refleet-soak");
    std::fs::create_dir_all(&scratch)?;
    let storage = scratch.join("storage");
    let log = scratch.join("reflector.log");
    let mut args: Vec<String> = vec![
        "--drain-timeout".into(),
        format!("{}ms", spec.drain_timeout.as_millis()),
    ];
    args.extend(extra.iter().filter(|a| !a.is_empty()).cloned());
    let mut r = start_reflector(binary, "127.0.0.1:0", &storage, &log, &args).await?;
    eprintln!(
        "soak: reflector pid {} at {} (storage and log in {})",
        r.pid,
        r.box_url,
        scratch.display()
    );
    let hostport = r
        .box_url
        .strip_prefix("http://")
        .and_then(|x| x.split('/').next())
        .context("box URL")?
        .to_string();
    let server: SocketAddr = tokio::net::lookup_host(&hostport)
        .await?
        .next()
        .context("reflector address")?;
    let tag = format!(
        "soak-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let ctx = Arc::new(Ctx {
        ws_base: format!("ws://{hostport}/reflector/"),
        files_base: format!("{}files", r.box_url),
        server,
        sids: (0..spec.sessions.max(1))
            .map(|i| format!("{tag}-s{i}"))
            .collect(),
        c: Counters::default(),
        sessions: Mutex::new(vec![SessionSeen::default(); spec.sessions.max(1)]),
        ends: Mutex::new(BTreeMap::new()),
        finishing: AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        base: Instant::now(),
        spec: spec.clone(),
    });

    // Sampler.
    let samples: Arc<Mutex<Vec<ProcPoint>>> = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let (ctx, samples, pid) = (ctx.clone(), samples.clone(), r.pid);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(ctx.spec.sample_every);
            while !ctx.finishing.load(Ordering::Acquire) {
                every.tick().await;
                let t = ctx.base.elapsed().as_secs_f64();
                if let Some(p) = proc_point(pid, t, ctx.c.live.load(Ordering::Relaxed))
                    && let Ok(mut s) = samples.lock()
                {
                    s.push(p);
                }
            }
        })
    };

    // The slots; they start spread over the first tenth of the warm-up.
    let ramp = spec.warmup / 10;
    let mut slots = Vec::with_capacity(spec.connections);
    for slot in 0..spec.connections {
        let ctx = ctx.clone();
        let delay = ramp.mul_f64(slot as f64 / spec.connections.max(1) as f64);
        slots.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            run_slot(ctx, slot).await;
        }));
    }
    let mut last_report = Instant::now();
    while ctx.base.elapsed() < spec.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            let last = samples.lock().ok().and_then(|s| s.last().copied());
            eprintln!(
                "soak: {:.0} s, live {}, opened {}, sent {}, received {}, lost {}, RSS {} KiB, fds {}",
                ctx.base.elapsed().as_secs_f64(),
                ctx.c.live.load(Ordering::Relaxed),
                ctx.c.opened.load(Ordering::Relaxed),
                ctx.c.sent.load(Ordering::Relaxed),
                ctx.c.received.load(Ordering::Relaxed),
                ctx.c.lost.load(Ordering::Relaxed) + ctx.c.own_lost.load(Ordering::Relaxed),
                last.map_or(0, |p| p.rss_kib),
                last.map_or(0, |p| p.fds),
            );
        }
    }
    // Finish: stop churn and sending, let the last messages come back, then drain.
    let churn_end = ctx.base.elapsed().as_secs_f64();
    ctx.finishing.store(true, Ordering::Release);
    let _ = sampler.await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let metrics_before_drain = metrics(&r.box_url).await;
    let drain_started = Instant::now();
    let drain_exit = r
        .terminate(spec.drain_timeout + Duration::from_secs(60))
        .await;
    let drain_s = drain_started.elapsed().as_secs_f64();
    for s in slots {
        let _ = tokio::time::timeout(Duration::from_secs(30), s).await;
    }

    // Stored sessions, then a new reflector on the same storage and port.
    let sessions_stored = std::fs::read_dir(storage.join("sessions"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.ends_with(".json") && ctx.sids.iter().any(|s| n == format!("{s}.json"))
                })
                .count()
        })
        .unwrap_or(0);
    let seen = ctx.sessions.lock().map(|s| s.clone()).unwrap_or_default();
    let mut resume = Vec::new();
    match start_reflector(binary, &hostport, &storage, &log, &args).await {
        Ok(mut r2) => {
            for (i, sid) in ctx.sids.iter().enumerate() {
                resume.push(resume_one(&ctx, sid, i, seen.get(i)).await);
            }
            let _ = r2
                .terminate(spec.drain_timeout + Duration::from_secs(30))
                .await;
        }
        Err(e) => resume.push(Resumed {
            session: "*".into(),
            ok: false,
            detail: format!("restart failed: {e:#}"),
        }),
    }
    let sessions_resumed = resume.iter().filter(|r| r.ok).count();

    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    let warm = spec.warmup.as_secs_f64();
    let window: Vec<&ProcPoint> = samples
        .iter()
        .filter(|p| p.t_s >= warm && p.t_s <= churn_end)
        .collect();
    let rss_pts: Vec<(f64, f64)> = window
        .iter()
        .map(|p| (p.t_s / 60.0, p.rss_kib as f64))
        .collect();
    let fd_pts: Vec<(f64, f64)> = window
        .iter()
        .map(|p| (p.t_s / 60.0, p.fds as f64))
        .collect();
    let mean = |v: &[(f64, f64)]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().map(|p| p.1).sum::<f64>() / v.len() as f64
        }
    };
    let window_min = (churn_end - warm).max(0.0) / 60.0;
    let rss_slope = slope(&rss_pts);
    let fd_slope = slope(&fd_pts);
    let (rss_mean, fd_mean) = (mean(&rss_pts), mean(&fd_pts));
    let pct = |s: Option<f64>, m: f64| s.filter(|_| m > 0.0).map(|s| s * window_min / m * 100.0);
    let rss_growth = pct(rss_slope, rss_mean);
    let fd_growth = pct(fd_slope, fd_mean);

    let c = &ctx.c;
    let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    match rss_growth {
        Some(g) if g <= spec.max_rss_growth_pct => {}
        Some(g) => failures.push(format!(
            "RSS grows {g:.2} % over the post-warm-up window (bound {} %)",
            spec.max_rss_growth_pct
        )),
        None => failures.push("no RSS samples after the warm-up".into()),
    }
    match fd_growth {
        Some(g) if g <= spec.max_fd_growth_pct => {}
        Some(g) => failures.push(format!(
            "descriptors grow {g:.2} % over the post-warm-up window (bound {} %)",
            spec.max_fd_growth_pct
        )),
        None => failures.push("no fd samples after the warm-up".into()),
    }
    let faults =
        ld(&c.lost) + ld(&c.own_lost) + ld(&c.reordered) + ld(&c.seq_gaps) + ld(&c.seq_backwards);
    if faults > 0 {
        failures.push(format!(
            "well-behaved clients saw {faults} lost, reordered or out-of-sequence messages"
        ));
    }
    if ld(&c.unplanned) > 0 {
        failures.push(format!(
            "{} well-behaved connections ended unplanned",
            ld(&c.unplanned)
        ));
    }
    if sessions_stored < ctx.sids.len() {
        failures.push(format!(
            "{} of {} sessions stored",
            sessions_stored,
            ctx.sids.len()
        ));
    }
    if sessions_resumed < ctx.sids.len() {
        failures.push(format!(
            "{} of {} sessions resumed",
            sessions_resumed,
            ctx.sids.len()
        ));
    }
    if !drain_exit.contains("exited") {
        failures.push(format!("drain: {drain_exit}"));
    }
    let _ = std::fs::remove_dir_all(&storage);
    Ok(SoakReport {
        connections: spec.connections,
        sessions: ctx.sids.len(),
        duration_s: spec.duration.as_secs_f64(),
        warmup_s: warm,
        seed: spec.seed,
        reflector_args: args,
        rss_slope_kib_per_min: rss_slope,
        fd_slope_per_min: fd_slope,
        rss_mean_after_warmup_kib: rss_mean,
        fds_mean_after_warmup: fd_mean,
        rss_growth_over_window_pct: rss_growth,
        fd_growth_over_window_pct: fd_growth,
        rss_peak_kib: samples.iter().map(|p| p.rss_kib).max().unwrap_or(0),
        fds_peak: samples.iter().map(|p| p.fds).max().unwrap_or(0),
        connections_opened: ld(&c.opened),
        joined: ld(&c.joined),
        join_failed: ld(&c.join_failed),
        polite_leaves: ld(&c.polite),
        abrupt_disconnects: ld(&c.abrupt),
        slow_reader_connections: ld(&c.slow),
        messages_sent: ld(&c.sent),
        messages_received: ld(&c.received),
        recvs: ld(&c.recvs),
        lost: ld(&c.lost),
        own_lost: ld(&c.own_lost),
        reordered_or_duplicated: ld(&c.reordered),
        seq_gaps: ld(&c.seq_gaps),
        seq_backwards: ld(&c.seq_backwards),
        unplanned_ends: ld(&c.unplanned),
        snaps_sent: ld(&c.snaps),
        saves_sent: ld(&c.saves),
        ends: ctx.ends.lock().map(|m| m.clone()).unwrap_or_default(),
        timeline_changes: seen.iter().map(|s| s.timeline_changes).sum(),
        metrics_before_drain,
        drain_exit,
        drain_s,
        sessions_stored,
        sessions_resumed,
        resume,
        failures,
        samples,
    })
}

/// One client JOINs a session on the restarted reflector: same timeline, seq at or after the
/// last one seen during the run.
async fn resume_one(ctx: &Ctx, sid: &str, i: usize, seen: Option<&SessionSeen>) -> Resumed {
    let fail = |d: String| Resumed {
        session: sid.to_string(),
        ok: false,
        detail: d,
    };
    let url = format!("{}{sid}", ctx.ws_base);
    let mut ws = match tokio::time::timeout(
        Duration::from_secs(10),
        client::connect(&url, ctx.server, Ipv4Addr::LOCALHOST, ctx.spec.read_buffer),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return fail(format!("connect: {e}")),
        Err(_) => return fail("connect timed out".into()),
    };
    let join = wire::join_frame(sid, &format!("resume{i:05}"), ctx.spec.tick_ms);
    if ws.send(Message::Text(join.into())).await.is_err() {
        return fail("JOIN not sent".into());
    }
    let sync = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m
                && let Ok(Frame::Sync) = wire::parse(t.as_str())
            {
                return serde_json::from_str::<serde_json::Value>(t.as_str()).ok();
            }
        }
        None
    })
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    let Ok(Some(sync)) = sync else {
        return fail("no SYNC".into());
    };
    let timeline = sync["args"]["timeline"].as_str().unwrap_or("").to_string();
    let seq = sync["args"]["seq"].as_u64().map(|s| s as u32);
    let Some(seen) = seen.filter(|s| s.timeline.is_some()) else {
        return fail(format!(
            "never joined during the run (SYNC timeline {timeline})"
        ));
    };
    let want = seen.timeline.as_deref().unwrap_or("");
    if timeline != want {
        return fail(format!("timeline {timeline}, expected {want}"));
    }
    match (seq, seen.last_seq) {
        (Some(s), Some(last)) if s == last || seq_after(last, s) => Resumed {
            session: sid.to_string(),
            ok: true,
            detail: format!(
                "timeline {timeline}, SYNC seq {s} ({} after the last seen)",
                s.wrapping_sub(last)
            ),
        },
        (s, last) => fail(format!("SYNC seq {s:?} before the last seen {last:?}")),
    }
}

async fn run_slot(ctx: Arc<Ctx>, slot: usize) {
    let mut rng = Rng::new(ctx.spec.seed ^ (slot as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let session = slot % ctx.sids.len();
    let slow = slot < ctx.spec.slow_readers;
    while !ctx.finishing.load(Ordering::Acquire) {
        let kind = if slow {
            Kind::Slow
        } else if rng.unit() * 100.0 < ctx.spec.abrupt_pct {
            Kind::Abrupt
        } else {
            Kind::Polite
        };
        let life = rng.between(ctx.spec.life_min, ctx.spec.life_max);
        ctx.c.live.fetch_add(1, Ordering::Relaxed);
        let end = Conn::new(&ctx, session, kind, &mut rng).run(life).await;
        ctx.c.live.fetch_sub(1, Ordering::Relaxed);
        ctx.end(format!("{}:{end}", kind.name()));
        if end.starts_with("failed") {
            // Do not hammer a reflector that refuses; try again a little later.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

struct Conn<'a> {
    ctx: &'a Ctx,
    session: usize,
    kind: Kind,
    id: u32,
    view: String,
    sid_json: String,
    synced: bool,
    joined: bool,
    timeline: Option<String>,
    next_seq: Option<u32>,
    last_seq: Option<u32>,
    last_time: u64,
    /// Next counter expected from each other sender seen.
    senders: HashMap<u32, u64>,
    sent: u64,
    echoed: u64,
    since_snap: u64,
    save: bool,
}

type Ws = WebSocketStream<TcpStream>;

impl<'a> Conn<'a> {
    fn new(ctx: &'a Ctx, session: usize, kind: Kind, rng: &mut Rng) -> Self {
        let id = ctx.next_id.fetch_add(1, Ordering::Relaxed) as u32;
        Conn {
            ctx,
            session,
            kind,
            id,
            view: format!("k{id:08x}"),
            sid_json: format!("\"{}\"", ctx.sids[session]),
            synced: false,
            joined: false,
            timeline: None,
            next_seq: None,
            last_seq: None,
            last_time: 0,
            senders: HashMap::new(),
            sent: 0,
            echoed: 0,
            since_snap: 0,
            save: rng.unit() * 100.0 < ctx.spec.save_pct,
        }
    }

    /// One connection's life; returns how it ended.
    async fn run(mut self, life: Duration) -> String {
        let ctx = self.ctx;
        ctx.c.opened.fetch_add(1, Ordering::Relaxed);
        let sid = ctx.sids[self.session].clone();
        let url = format!("{}{sid}", ctx.ws_base);
        let mut ws = match tokio::time::timeout(
            Duration::from_secs(10),
            client::connect(&url, ctx.server, Ipv4Addr::LOCALHOST, ctx.spec.read_buffer),
        )
        .await
        {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                ctx.c.join_failed.fetch_add(1, Ordering::Relaxed);
                return format!("failed connect: {}", short(&e.to_string()));
            }
            Err(_) => {
                ctx.c.join_failed.fetch_add(1, Ordering::Relaxed);
                return "failed connect: timeout".into();
            }
        };
        let join = wire::join_frame(&sid, &self.view, ctx.spec.tick_ms);
        if ws.send(Message::Text(join.into())).await.is_err() {
            ctx.c.join_failed.fetch_add(1, Ordering::Relaxed);
            return "failed JOIN send".into();
        }
        // Wait for SYNC and our own view in `users`.
        let joined = tokio::time::timeout(
            Duration::from_secs(30),
            self.read_while(&mut ws, |c| !(c.synced && c.joined)),
        )
        .await;
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                ctx.c.join_failed.fetch_add(1, Ordering::Relaxed);
                self.note_session();
                return format!("failed join: {e}");
            }
            Err(_) => {
                ctx.c.join_failed.fetch_add(1, Ordering::Relaxed);
                return "failed join: timeout".into();
            }
        }
        ctx.c.joined.fetch_add(1, Ordering::Relaxed);
        if self.save {
            let frame = format!(
                "{{\"id\":{},\"action\":\"SAVE\",\"args\":{{\"persistTime\":{},\"url\":\"{}/apps/io.refleet.bench/p/save/{:016x}\",\"dissident\":null}}}}",
                self.sid_json, self.last_time, ctx.files_base, self.id
            );
            if ws.send(Message::Text(frame.into())).await.is_ok() {
                ctx.c.saves.fetch_add(1, Ordering::Relaxed);
            }
        }
        let end = match self.kind {
            Kind::Slow => self.slow(&mut ws).await,
            Kind::Polite | Kind::Abrupt => self.live(&mut ws, life).await,
        };
        self.note_session();
        end
    }

    /// Records the session's timeline and the last seq this connection saw.
    fn note_session(&self) {
        let Ok(mut s) = self.ctx.sessions.lock() else {
            return;
        };
        let seen = &mut s[self.session];
        if let Some(t) = &self.timeline {
            if seen.timeline.as_ref().is_some_and(|x| x != t) {
                seen.timeline_changes += 1;
            }
            seen.timeline = Some(t.clone());
        }
        if let Some(q) = self.last_seq
            && seen.last_seq.is_none_or(|l| seq_after(l, q))
        {
            seen.last_seq = Some(q);
        }
    }

    async fn send_one(&mut self, ws: &mut Ws, flush: bool) -> Result<(), String> {
        let stamp = Stamp {
            sender: self.id,
            counter: self.sent,
            sent_ns: self.ctx.base.elapsed().as_nanos() as u64,
        };
        let frame = wire::send_frame(&self.sid_json, stamp, 64);
        let r = if flush {
            ws.send(Message::Text(frame.into())).await
        } else {
            ws.feed(Message::Text(frame.into())).await
        };
        r.map_err(|e| format!("write: {}", short(&e.to_string())))?;
        self.sent += 1;
        self.ctx.c.sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A polite or abrupt connection: send at the rate for its life, then leave.
    async fn live(&mut self, ws: &mut Ws, life: Duration) -> String {
        let ctx = self.ctx;
        let start = Instant::now();
        let until = start + life;
        let period = Duration::from_secs_f64(1.0 / ctx.spec.rate.max(0.001));
        let mut next = start + period.mul_f64((self.id % 97) as f64 / 97.0);
        let mut finishing = false;
        loop {
            if !finishing && ctx.finishing.load(Ordering::Acquire) {
                finishing = true;
                if self.kind == Kind::Abrupt {
                    ctx.c.abrupt.fetch_add(1, Ordering::Relaxed);
                    return "dropped at the end".into();
                }
            }
            let now = Instant::now();
            if !finishing && now >= until {
                break;
            }
            let wake = if finishing {
                now + Duration::from_millis(200)
            } else {
                next.min(until)
            };
            tokio::select! {
                item = ws.next() => match item {
                    Some(Ok(Message::Text(t))) => {
                        if let Err(e) = self.text(t.as_str(), ws).await {
                            return self.unplanned(e);
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        let code = f.map_or(1005, |f| u16::from(f.code));
                        if finishing {
                            self.own_check();
                            return format!("closed {code} in the drain");
                        }
                        return self.unplanned(format!("closed {code}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if finishing {
                            self.own_check();
                            return "read error in the drain".into();
                        }
                        return self.unplanned(format!("read: {}", short(&e.to_string())));
                    }
                    None => {
                        if finishing {
                            self.own_check();
                            return "dropped in the drain".into();
                        }
                        return self.unplanned("dropped".into());
                    }
                },
                () = tokio::time::sleep_until(wake) => {
                    if !finishing && Instant::now() >= next {
                        if let Err(e) = self.send_one(ws, true).await {
                            return self.unplanned(e);
                        }
                        next += period;
                    }
                }
            }
        }
        if self.kind == Kind::Abrupt {
            // Drop the TCP connection without a close frame, messages possibly in flight.
            ctx.c.abrupt.fetch_add(1, Ordering::Relaxed);
            return "dropped without a close frame".into();
        }
        // Wait until our own messages came back, then close politely.
        let waited = tokio::time::timeout(
            Duration::from_secs(10),
            self.read_while(ws, |c| c.echoed < c.sent),
        )
        .await;
        match waited {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.unplanned(e),
            Err(_) => {
                self.own_check();
                return self.unplanned("own messages did not come back within 10 s".into());
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        ctx.c.polite.fetch_add(1, Ordering::Relaxed);
        "left politely".into()
    }

    /// Counts own messages that never came back.
    fn own_check(&mut self) {
        let missing = self.sent.saturating_sub(self.echoed);
        if missing > 0 {
            self.ctx.c.own_lost.fetch_add(missing, Ordering::Relaxed);
            self.echoed = self.sent;
        }
    }

    fn unplanned(&mut self, why: String) -> String {
        self.ctx.c.unplanned.fetch_add(1, Ordering::Relaxed);
        format!("unplanned {why}")
    }

    /// A slow reader: stops reading and keeps sending until cut off or the stall ends.
    async fn slow(&mut self, ws: &mut Ws) -> String {
        let ctx = self.ctx;
        ctx.c.slow.fetch_add(1, Ordering::Relaxed);
        let stall = ctx.spec.slow_stall;
        let until = Instant::now() + stall;
        let period = Duration::from_secs_f64(1.0 / ctx.spec.slow_rate.max(0.001));
        let mut next = Instant::now();
        let mut write_err = None;
        while Instant::now() < until && !ctx.finishing.load(Ordering::Acquire) {
            tokio::time::sleep_until(next).await;
            next += period;
            let sent = tokio::time::timeout(Duration::from_secs(5), self.send_one(ws, true)).await;
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    write_err = Some(e);
                    break;
                }
                Err(_) => {
                    write_err = Some("write blocked".to_string());
                    break;
                }
            }
        }
        if ctx.finishing.load(Ordering::Acquire) && write_err.is_none() {
            return "dropped at the end".into();
        }
        // Read the backlog (bounded) to see how the reflector ended it.
        let mut frames = 0u64;
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Close(f))) => {
                        return format!("closed {}", f.map_or(1005, |f| u16::from(f.code)));
                    }
                    Some(Ok(_)) => frames += 1,
                    Some(Err(e)) => return format!("reset ({})", short(&e.to_string())),
                    None => return "dropped by the reflector".into(),
                }
            }
        })
        .await
        .unwrap_or_else(|_| "still open after the stall".into());
        eprintln!(
            "soak: slow reader {} ended: {end} after {frames} buffered frames",
            self.id
        );
        match write_err {
            Some(_) => format!("{end} (writes failed)"),
            None => end,
        }
    }

    /// Reads and handles frames while `more` holds; a close, a read error or the end of the
    /// stream ends it with the reason.
    async fn read_while(&mut self, ws: &mut Ws, more: fn(&Self) -> bool) -> Result<(), String> {
        while more(self) {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => self.text(t.as_str(), ws).await?,
                Some(Ok(Message::Close(f))) => {
                    return Err(format!("closed {}", f.map_or(1005, |f| u16::from(f.code))));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("read: {}", short(&e.to_string()))),
                None => return Err("dropped".into()),
            }
        }
        Ok(())
    }

    /// Handles one text frame: checks and bookkeeping.
    async fn text(&mut self, text: &str, ws: &mut Ws) -> Result<(), String> {
        let frame = wire::parse(text).map_err(|e| format!("parse: {e}"))?;
        match frame {
            Frame::Sync => {
                let v: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| format!("SYNC: {e}"))?;
                let seq = v["args"]["seq"].as_u64().ok_or("SYNC without seq")? as u32;
                self.timeline = v["args"]["timeline"].as_str().map(String::from);
                self.last_time = v["args"]["time"].as_f64().unwrap_or(0.0).max(0.0) as u64;
                self.next_seq = Some(seq.wrapping_add(1));
                self.last_seq = Some(seq);
                self.synced = true;
            }
            Frame::Recv { time, seq, payload } => {
                if !self.synced {
                    return Ok(());
                }
                self.ctx.c.recvs.fetch_add(1, Ordering::Relaxed);
                match self.next_seq {
                    Some(n) if n == seq => {}
                    Some(n) if seq_after(n.wrapping_sub(1), seq) => {
                        self.ctx.c.seq_gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        self.ctx.c.seq_backwards.fetch_add(1, Ordering::Relaxed);
                    }
                }
                self.next_seq = Some(seq.wrapping_add(1));
                self.last_seq = Some(seq);
                self.last_time = time;
                match payload {
                    Payload::Bench(s) => {
                        self.ctx.c.received.fetch_add(1, Ordering::Relaxed);
                        if s.sender == self.id {
                            if s.counter == self.echoed {
                                self.echoed += 1;
                            } else if s.counter > self.echoed {
                                self.ctx
                                    .c
                                    .own_lost
                                    .fetch_add(s.counter - self.echoed, Ordering::Relaxed);
                                self.echoed = s.counter + 1;
                            } else {
                                self.ctx.c.reordered.fetch_add(1, Ordering::Relaxed);
                            }
                        } else {
                            let next = self.senders.entry(s.sender).or_insert(s.counter);
                            if s.counter == *next {
                                *next += 1;
                            } else if s.counter > *next {
                                self.ctx
                                    .c
                                    .lost
                                    .fetch_add(s.counter - *next, Ordering::Relaxed);
                                *next = s.counter + 1;
                            } else {
                                self.ctx.c.reordered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Payload::Meta(m) => {
                        if !self.joined && m.contains("\"users\"") && m.contains(&self.view) {
                            self.joined = true;
                        }
                    }
                    Payload::Foreign(_) => {}
                }
                self.since_snap += 1;
                if self.ctx.spec.snap_every > 0 && self.since_snap >= self.ctx.spec.snap_every {
                    self.snap(ws).await?;
                }
            }
            Frame::Other("REQU") => self.snap(ws).await?,
            Frame::Tick { .. } | Frame::Other(_) => {}
        }
        Ok(())
    }

    /// Announces a snapshot under the session's own files prefix.
    async fn snap(&mut self, ws: &mut Ws) -> Result<(), String> {
        self.since_snap = 0;
        let (t, q) = (self.last_time, self.last_seq.unwrap_or(0));
        let frame = format!(
            "{{\"id\":{},\"action\":\"SNAP\",\"args\":{{\"time\":{t},\"seq\":{q},\"hash\":\"soak\",\"url\":\"{}/snapshots/{}/{t:010}_{q}.soak\",\"dissident\":null}}}}",
            self.sid_json, self.ctx.files_base, self.ctx.sids[self.session]
        );
        ws.send(Message::Text(frame.into()))
            .await
            .map_err(|e| format!("SNAP: {}", short(&e.to_string())))?;
        self.ctx.c.snaps.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// An error message cut to a short, countable form.
fn short(s: &str) -> String {
    s.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_is_its_gradient() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64, 3.0 + 2.5 * i as f64)).collect();
        let s = slope(&pts).unwrap_or(f64::NAN);
        assert!((s - 2.5).abs() < 1e-9, "{s}");
    }

    #[test]
    fn slope_of_noise_around_a_flat_line_is_near_zero() {
        let pts: Vec<(f64, f64)> = (0..100)
            .map(|i| (i as f64, if i % 2 == 0 { 10.0 } else { 12.0 }))
            .collect();
        let s = slope(&pts).unwrap_or(f64::NAN);
        assert!(s.abs() < 0.01, "{s}");
    }

    #[test]
    fn slope_needs_two_distinct_x() {
        assert_eq!(slope(&[]), None);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 5.0)]), None);
    }

    #[test]
    fn the_generator_is_deterministic_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..1000 {
            let x = a.unit();
            assert_eq!(x, b.unit());
            assert!((0.0..1.0).contains(&x));
        }
        let d = a.between(Duration::from_secs(2), Duration::from_secs(4));
        assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(4));
    }
}
