//! Idle mode: many joined connections that send nothing (but PULSE), added in steps; after
//! each step the reflector's RSS per connection and the tick lateness of a sample of clients.
//!
//! Loopback has about 28 000 ephemeral ports per source address, so client `i` binds to
//! `127.0.0.(1 + i / per_source)`.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::client::{self, Phase, Shared, Spec};
use crate::load::{Endpoint, Latency};
use crate::procstat::{Proc, Usage};
use crate::wire::PAYLOAD_HEADER;

/// The shape of an idle run.
#[derive(Debug, Clone)]
pub struct IdleSpec {
    /// Total connections after each step, ascending.
    pub steps: Vec<usize>,
    /// Clients per session.
    pub per_session: usize,
    /// Tick interval requested at JOIN, ms.
    pub tick_ms: u32,
    /// Pause after a step's connections joined, before measuring.
    pub settle: Duration,
    /// Tick-lateness measuring window per step.
    pub measure: Duration,
    /// Clients whose ticks are timed (spread evenly over all connections).
    pub sample: usize,
    /// Connections per source address.
    pub per_source: usize,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// How long one step's joining may take.
    pub join_timeout: Duration,
    /// WebSocket read buffer per client, bytes.
    pub read_buffer: usize,
}

/// One step of an idle run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleStep {
    /// Connections asked for so far.
    pub connections: usize,
    /// Connections joined so far.
    pub joined: usize,
    /// Connections that failed to connect or join, or ended.
    pub failed: usize,
    /// Reflector RSS after the step settled, KiB.
    pub rss_kib: Option<u64>,
    /// (RSS − RSS before any connection) / joined, KiB.
    pub rss_per_conn_kib: Option<f64>,
    /// RSS growth per connection added in this step, KiB.
    pub rss_per_added_conn_kib: Option<f64>,
    /// Tick lateness (arrival gap minus the tick interval) on the sampled clients, µs.
    pub tick_lateness: Latency,
    /// Reflector CPU during the measuring window, cores.
    pub reflector_cores: Option<f64>,
    /// Time the step's joins took, s.
    pub join_s: f64,
}

/// The result of an idle run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    pub tick_ms: u32,
    pub per_session: usize,
    pub per_source: usize,
    pub baseline_rss_kib: Option<u64>,
    pub steps: Vec<IdleStep>,
    /// The bench over the whole run.
    pub bench: Usage,
}

impl IdleReport {
    /// Every connection joined and stayed.
    pub fn is_clean(&self) -> bool {
        self.steps.iter().all(|s| s.failed == 0)
    }
}

impl std::fmt::Display for IdleReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "idle: {} clients per session, ticks every {} ms, reflector RSS before connections {} KiB",
            self.per_session,
            self.tick_ms,
            self.baseline_rss_kib
                .map_or("?".to_string(), |v| v.to_string())
        )?;
        for s in &self.steps {
            writeln!(
                f,
                "  {} connections ({} joined, {} failed, joins took {:.1} s): RSS {} KiB, {} KiB/conn overall, {} KiB/conn added; reflector {} cores",
                s.connections,
                s.joined,
                s.failed,
                s.join_s,
                s.rss_kib.map_or("?".to_string(), |v| v.to_string()),
                s.rss_per_conn_kib
                    .map_or("?".to_string(), |v| format!("{v:.1}")),
                s.rss_per_added_conn_kib
                    .map_or("?".to_string(), |v| format!("{v:.1}")),
                s.reflector_cores
                    .map_or("?".to_string(), |v| format!("{v:.2}")),
            )?;
            writeln!(f, "    tick lateness: {}", s.tick_lateness)?;
        }
        writeln!(
            f,
            "  bench: {:.2} CPU s, RSS {} KiB",
            self.bench.cpu_s, self.bench.rss_end_kib
        )
    }
}

/// Runs an idle test.
pub async fn run(ep: &Endpoint, tag: &str, spec: &IdleSpec) -> anyhow::Result<IdleReport> {
    let Some(&total) = spec.steps.last() else {
        bail!("no connection counts given");
    };
    if spec.steps.windows(2).any(|w| w[0] >= w[1]) || spec.steps[0] == 0 {
        bail!("connection counts must be positive and ascending");
    }
    if let Ok((soft, _)) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        && total as u64 + 64 > soft
    {
        bail!(
            "{total} connections need more open files than this process may have ({soft}); \
             raise the hard limit (ulimit -Hn) first"
        );
    }
    let per_session = spec.per_session.max(1);
    let per_source = spec.per_source.max(1);
    let sample_every = (total / spec.sample.max(1)).max(1);
    let shared = Shared::new(total);
    let (phase_tx, phase_rx) = watch::channel(Phase::Joining);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let deadline = Instant::now()
        + (spec.join_timeout + spec.settle + spec.measure + Duration::from_secs(5))
            * spec.steps.len() as u32
        + Duration::from_secs(60);
    let own_a = Proc::Own.sample();
    let baseline = ep.reflector.and_then(Proc::sample).map(|s| s.rss_kib);
    let mut handles = Vec::with_capacity(total);
    let mut steps = Vec::new();
    let mut joined = 0;
    let mut failed = 0;
    let mut prev_rss = baseline;
    let mut prev_joined = 0;
    for &target in &spec.steps {
        let began = Instant::now();
        let step_deadline = began + spec.join_timeout;
        while joined + failed < target {
            while handles.len() < target && handles.len() - joined - failed < spec.concurrency {
                let i = handles.len();
                let s = i / per_session;
                let session = format!("{tag}-s{s}");
                let octet = 1 + i / per_source;
                if octet > 254 {
                    bail!("too many connections for the source addresses 127.0.0.1-254");
                }
                let client = Spec {
                    idx: i,
                    url: format!("{}{session}", ep.ws_base),
                    session_json: format!("\"{session}\""),
                    server: ep.server,
                    source: Ipv4Addr::new(127, 0, 0, octet as u8),
                    rate: 0.0,
                    offset: Duration::ZERO,
                    payload_bytes: PAYLOAD_HEADER,
                    tick_ms: spec.tick_ms,
                    first_sender: (s * per_session) as u32,
                    senders: 0,
                    stall: false,
                    snapshot_every: 0,
                    sample_ticks: i % sample_every == 0,
                    batch_interval: Duration::from_millis(5),
                    read_buffer: spec.read_buffer,
                };
                handles.push(tokio::spawn(client::run(
                    client,
                    shared.clone(),
                    phase_rx.clone(),
                    ready_tx.clone(),
                    deadline,
                )));
            }
            match tokio::time::timeout_at(step_deadline, ready_rx.recv()).await {
                Ok(Some((_, true))) => joined += 1,
                Ok(Some((_, false))) => failed += 1,
                Ok(None) | Err(_) => {
                    failed = handles.len() - joined;
                    break;
                }
            }
        }
        let join_s = began.elapsed().as_secs_f64();
        tokio::time::sleep(spec.settle).await;
        let rss = ep.reflector.and_then(Proc::sample).map(|s| s.rss_kib);
        if let Ok(mut h) = shared.ticks.lock() {
            h.reset();
        }
        let refl_a = ep.reflector.and_then(Proc::sample);
        let start = Instant::now();
        let _ = phase_tx.send(Phase::Measure {
            start,
            end: start + spec.measure,
        });
        tokio::time::sleep(spec.measure).await;
        let _ = phase_tx.send(Phase::Joining);
        let refl_b = ep.reflector.and_then(Proc::sample);
        let lateness = shared
            .ticks
            .lock()
            .map(|h| Latency::of(&h))
            .unwrap_or_default();
        let ended = shared
            .ended
            .iter()
            .filter(|e| e.load(std::sync::atomic::Ordering::Acquire))
            .count();
        steps.push(IdleStep {
            connections: target,
            joined,
            failed: failed.max(ended),
            rss_kib: rss,
            rss_per_conn_kib: match (rss, baseline) {
                (Some(r), Some(b)) if joined > 0 => Some((r as f64 - b as f64) / joined as f64),
                _ => None,
            },
            rss_per_added_conn_kib: match (rss, prev_rss) {
                (Some(r), Some(p)) if joined > prev_joined => {
                    Some((r as f64 - p as f64) / (joined - prev_joined) as f64)
                }
                _ => None,
            },
            tick_lateness: lateness,
            reflector_cores: match (refl_a, refl_b) {
                (Some(a), Some(b)) => Some(Usage::between(&a, &b).cores),
                _ => None,
            },
            join_s,
        });
        prev_rss = rss;
        prev_joined = joined;
        if failed > 0 {
            break;
        }
    }
    let _ = phase_tx.send(Phase::Stop);
    drop(ready_tx);
    let _ = crate::load::collect(handles).await;
    let own_b = Proc::Own.sample();
    Ok(IdleReport {
        tick_ms: spec.tick_ms,
        per_session,
        per_source,
        baseline_rss_kib: baseline,
        steps,
        bench: match (own_a, own_b) {
            (Some(a), Some(b)) => Usage::between(&a, &b),
            _ => Usage::default(),
        },
    })
}
