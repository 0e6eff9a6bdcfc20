//! One load run: `sessions × clients` connections join, send at a fixed rate for a while,
//! wait until every client has received every message sent to its session, and report.
//!
//! The coordinator only flips the shared [`Phase`] and watches counters; the clients do the
//! work. Latency, integrity and the reflector's CPU and memory are gathered per run.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::check::Faults;
use crate::client::{self, Outcome, Phase, Shared, Spec};
use crate::procstat::{Proc, Usage};
use crate::wire::PAYLOAD_HEADER;

/// Pause after everyone joined, so the `users` messages of the last joins are out of the way.
const SETTLE: Duration = Duration::from_millis(300);
/// How often the coordinator samples the reflector during the send phase.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The shape of a load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Sessions.
    pub sessions: usize,
    /// Clients per session.
    pub clients: usize,
    /// SENDs per second per client.
    pub rate: f64,
    /// Payload size, bytes.
    pub payload_bytes: usize,
    /// How long clients send.
    pub duration: Duration,
    /// Tick interval requested at JOIN, ms.
    pub tick_ms: u32,
    /// Shortest pause between a client's send batches.
    pub batch_interval: Duration,
    /// How long to wait after sending for the last deliveries.
    pub drain_timeout: Duration,
    /// How long joining everyone may take.
    pub join_timeout: Duration,
    /// Each session's first client announces a snapshot every this many RECVs (0: never).
    pub snapshot_every: u64,
    /// Client 1 of session 0 stops reading once sending starts.
    pub stall: bool,
    /// WebSocket read buffer per client, bytes.
    pub read_buffer: usize,
}

impl LoadSpec {
    /// Deliveries per second the run asks for: every SEND goes to every client of its session.
    pub fn offered_deliveries(&self) -> f64 {
        (self.sessions * self.clients * self.clients) as f64 * self.rate
    }
}

/// Latency percentiles, µs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    /// The percentiles of a histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        write!(
            f,
            "p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms ({} samples)",
            ms(self.p50_us),
            ms(self.p90_us),
            ms(self.p99_us),
            ms(self.p999_us),
            ms(self.max_us),
            self.count
        )
    }
}

/// What the stalled client of a slow-consumer run saw.
#[derive(Debug, Clone, Serialize)]
pub struct Stalled {
    /// Close code the reflector sent it, if any reached it.
    pub close_code: Option<u16>,
    /// Bench messages it had received before it stopped reading.
    pub received: u64,
    /// How its connection ended (read after the run).
    pub end: Option<String>,
}

/// The result of one load run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub sessions: usize,
    pub clients: usize,
    pub rate_per_client: f64,
    pub payload_bytes: usize,
    pub duration_s: f64,
    /// Deliveries per second asked for.
    pub offered_deliveries_per_s: f64,
    /// SENDs sent by all clients.
    pub sent: u64,
    /// Distinct bench messages received by all (non-stalled) clients.
    pub deliveries: u64,
    /// Deliveries over the time from the first send to the last delivery.
    pub delivered_per_s: f64,
    /// Time from the end of sending until the last delivery (or the drain timeout).
    pub drain_s: f64,
    /// Every client received every message sent to its session.
    pub complete: bool,
    pub latency: Latency,
    pub faults: Faults,
    /// Clients whose connection ended during the run (closed by the reflector or failed).
    pub failed_clients: usize,
    /// Close codes received, with counts.
    pub close_codes: BTreeMap<u16, usize>,
    /// A few of the client errors.
    pub errors: Vec<String>,
    /// INFO frames received (SNAPSHOT_NEEDED means SENDs were dropped).
    pub infos: u64,
    /// RECVs whose payload the bench did not send.
    pub foreign: u64,
    /// The reflector from just before sending until the last delivery.
    pub reflector: Option<Usage>,
    /// Highest reflector RSS sampled during the run, KiB.
    pub reflector_rss_max_kib: Option<u64>,
    /// Reflector CPU per delivery, µs.
    pub reflector_cpu_us_per_delivery: Option<f64>,
    /// The bench itself over the same window.
    pub bench: Usage,
    pub stalled: Option<Stalled>,
}

impl LoadReport {
    /// No loss, duplication, reorder or failed client, and everything delivered.
    pub fn is_clean(&self) -> bool {
        self.faults.is_clean() && self.complete && self.failed_clients == 0 && self.foreign == 0
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} sessions × {} clients × {:.1} msg/s, {} B payloads, {:.1} s: offered {:.0} deliveries/s",
            self.sessions,
            self.clients,
            self.rate_per_client,
            self.payload_bytes,
            self.duration_s,
            self.offered_deliveries_per_s
        )?;
        writeln!(
            f,
            "  sent {}, delivered {} ({:.0}/s), drain {:.3} s, complete: {}",
            self.sent, self.deliveries, self.delivered_per_s, self.drain_s, self.complete
        )?;
        writeln!(f, "  latency: {}", self.latency)?;
        let x = &self.faults;
        writeln!(
            f,
            "  lost {}, duplicated {}, reordered {}, seq gaps {}, seq backwards {}, misrouted {}, foreign {}, failed clients {}{}",
            x.lost,
            x.duplicated,
            x.reordered,
            x.seq_gaps,
            x.seq_backwards,
            x.misrouted,
            self.foreign,
            self.failed_clients,
            if self.close_codes.is_empty() {
                String::new()
            } else {
                format!(" (close codes {:?})", self.close_codes)
            }
        )?;
        for e in &self.errors {
            writeln!(f, "  client error: {e}")?;
        }
        if self.infos > 0 {
            writeln!(f, "  INFO frames received: {}", self.infos)?;
        }
        if let Some(r) = &self.reflector {
            writeln!(
                f,
                "  reflector: {:.2} CPU s ({:.2} cores), {:.2} µs CPU per delivery, RSS {} → {} KiB (max {} KiB)",
                r.cpu_s,
                r.cores,
                self.reflector_cpu_us_per_delivery.unwrap_or(0.0),
                r.rss_start_kib,
                r.rss_end_kib,
                self.reflector_rss_max_kib.unwrap_or(0)
            )?;
        }
        writeln!(
            f,
            "  bench: {:.2} CPU s ({:.2} cores), RSS {} KiB",
            self.bench.cpu_s, self.bench.cores, self.bench.rss_end_kib
        )?;
        if let Some(s) = &self.stalled {
            writeln!(
                f,
                "  stalled client: received {} before stalling; {}",
                s.received,
                s.end.as_deref().unwrap_or("?")
            )?;
        }
        Ok(())
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// WebSocket base URL ending in `/`.
    pub ws_base: String,
    /// The address it resolves to.
    pub server: SocketAddr,
    /// The reflector process, when known.
    pub reflector: Option<Proc>,
}

impl Endpoint {
    /// Resolves the host of `ws_base`.
    pub async fn resolve(ws_base: &str, reflector: Option<Proc>) -> anyhow::Result<Self> {
        let host = ws_base
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .context("URL is not ws://HOST:PORT/...")?;
        let server = tokio::net::lookup_host(host)
            .await
            .with_context(|| format!("resolving {host}"))?
            .find(SocketAddr::is_ipv4)
            .with_context(|| format!("{host} has no IPv4 address"))?;
        if !server.ip().is_loopback() {
            bail!("the bench only sends load to loopback addresses, not {server}");
        }
        Ok(Endpoint {
            ws_base: ws_base.to_string(),
            server,
            reflector,
        })
    }
}

/// Runs one load run; sessions are named `<tag>-s<N>`, so every run gets fresh sessions.
pub async fn run(ep: &Endpoint, tag: &str, spec: &LoadSpec) -> anyhow::Result<LoadReport> {
    if spec.clients == 0 || spec.sessions == 0 {
        bail!("sessions and clients must be at least 1");
    }
    if spec.stall && spec.clients < 2 {
        bail!("slow-consumer runs need at least 2 clients per session");
    }
    let n = spec.sessions * spec.clients;
    let shared = Shared::new(n);
    let (phase_tx, phase_rx) = watch::channel(Phase::Joining);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let deadline = Instant::now()
        + spec.join_timeout
        + spec.duration
        + spec.drain_timeout
        + Duration::from_secs(30);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let s = i / spec.clients;
        let session = format!("{tag}-s{s}");
        let spec = Spec {
            idx: i,
            url: format!("{}{session}", ep.ws_base),
            session_json: format!("\"{session}\""),
            server: ep.server,
            source: Ipv4Addr::LOCALHOST,
            rate: spec.rate,
            offset: if spec.rate > 0.0 {
                Duration::from_secs_f64(i as f64 / n as f64 / spec.rate)
            } else {
                Duration::ZERO
            },
            payload_bytes: spec.payload_bytes.max(PAYLOAD_HEADER),
            tick_ms: spec.tick_ms,
            first_sender: (s * spec.clients) as u32,
            senders: spec.clients,
            stall: spec.stall && i == 1,
            snapshot_every: if i % spec.clients == 0 {
                spec.snapshot_every
            } else {
                0
            },
            sample_ticks: false,
            batch_interval: spec.batch_interval,
            read_buffer: spec.read_buffer,
        };
        handles.push(tokio::spawn(client::run(
            spec,
            shared.clone(),
            phase_rx.clone(),
            ready_tx.clone(),
            deadline,
        )));
    }
    drop(ready_tx);

    // Everyone joins.
    let join_deadline = Instant::now() + spec.join_timeout;
    let mut joined = 0;
    let mut failed = 0;
    while joined + failed < n {
        match tokio::time::timeout_at(join_deadline, ready_rx.recv()).await {
            Ok(Some((_, true))) => joined += 1,
            Ok(Some((_, false))) => failed += 1,
            Ok(None) | Err(_) => break,
        }
    }
    if joined < n {
        let _ = phase_tx.send(Phase::Stop);
        let outcomes = collect(handles).await;
        let errors: Vec<String> = outcomes
            .iter()
            .filter_map(|o| o.error.clone())
            .take(3)
            .collect();
        bail!(
            "only {joined} of {n} clients joined within {:?}: {errors:?}",
            spec.join_timeout
        );
    }
    tokio::time::sleep(SETTLE).await;

    // Send.
    let refl_a = ep.reflector.and_then(Proc::sample);
    let own_a = Proc::Own.sample();
    let start = Instant::now() + Duration::from_millis(20);
    let end = start + spec.duration;
    let _ = phase_tx.send(Phase::Go { start, end });
    let mut rss_max = refl_a.map(|s| s.rss_kib);
    while Instant::now() < end {
        tokio::time::sleep(SAMPLE_EVERY.min(end.saturating_duration_since(Instant::now()))).await;
        sample_max(ep.reflector, &mut rss_max);
    }

    // Wait for every sender's total, then for every delivery.
    let totals_deadline = Instant::now() + Duration::from_secs(5);
    while shared.done_sending.load(Ordering::Acquire) < n && Instant::now() < totals_deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent: Vec<u64> = shared
        .sent
        .iter()
        .map(|s| s.load(Ordering::Acquire))
        .collect();
    let session_total: Vec<u64> = sent.chunks(spec.clients).map(|c| c.iter().sum()).collect();
    let drain_deadline = end + spec.drain_timeout;
    let mut last_sample = Instant::now();
    let complete = loop {
        let done = (0..n).all(|i| {
            (spec.stall && i == 1)
                || shared.ended[i].load(Ordering::Acquire)
                || shared.received[i].load(Ordering::Relaxed) >= session_total[i / spec.clients]
        });
        if done {
            break true;
        }
        if Instant::now() >= drain_deadline {
            break false;
        }
        if last_sample.elapsed() >= SAMPLE_EVERY {
            sample_max(ep.reflector, &mut rss_max);
            last_sample = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let finished = Instant::now();
    let refl_b = ep.reflector.and_then(Proc::sample);
    let own_b = Proc::Own.sample();
    sample_max(ep.reflector, &mut rss_max);
    let _ = phase_tx.send(Phase::Stop);
    let outcomes = collect(handles).await;

    // Report.
    let mut latency = client::histogram();
    let mut faults = Faults::default();
    let mut deliveries = 0;
    let mut close_codes = BTreeMap::new();
    let mut errors = Vec::new();
    let mut failed_clients = 0;
    let mut infos = 0;
    let mut foreign = 0;
    let mut stalled = None;
    for o in &outcomes {
        if let Some(c) = o.close_code {
            *close_codes.entry(c).or_insert(0) += 1;
        }
        if o.stalled {
            stalled = Some(Stalled {
                close_code: o.close_code,
                received: o.tracker.unique,
                end: o.stall_end.clone(),
            });
            continue;
        }
        let ended = shared.ended[o.idx].load(Ordering::Acquire);
        if ended {
            failed_clients += 1;
            if let Some(e) = &o.error
                && errors.len() < 5
            {
                errors.push(format!("client {}: {e}", o.idx));
            }
            continue;
        }
        let s = o.idx / spec.clients;
        let session_sent: Vec<Option<u64>> = sent[s * spec.clients..(s + 1) * spec.clients]
            .iter()
            .map(|&x| Some(x))
            .collect();
        faults.add(&o.faults(&session_sent));
        deliveries += o.tracker.unique;
        infos += o.infos;
        foreign += o.foreign;
        if let Some(h) = &o.latency {
            let _ = latency.add(h);
        }
    }
    let window = finished.duration_since(start).as_secs_f64();
    let reflector = match (refl_a, refl_b) {
        (Some(a), Some(b)) => Some(Usage::between(&a, &b)),
        _ => None,
    };
    let bench = match (own_a, own_b) {
        (Some(a), Some(b)) => Usage::between(&a, &b),
        _ => Usage::default(),
    };
    Ok(LoadReport {
        sessions: spec.sessions,
        clients: spec.clients,
        rate_per_client: spec.rate,
        payload_bytes: spec.payload_bytes.max(PAYLOAD_HEADER),
        duration_s: spec.duration.as_secs_f64(),
        offered_deliveries_per_s: spec.offered_deliveries(),
        sent: sent.iter().sum(),
        deliveries,
        delivered_per_s: if window > 0.0 {
            deliveries as f64 / window
        } else {
            0.0
        },
        drain_s: finished.saturating_duration_since(end).as_secs_f64(),
        complete,
        latency: Latency::of(&latency),
        faults,
        failed_clients,
        close_codes,
        errors,
        infos,
        foreign,
        reflector_cpu_us_per_delivery: reflector
            .filter(|_| deliveries > 0)
            .map(|r| r.cpu_s * 1e6 / deliveries as f64),
        reflector,
        reflector_rss_max_kib: rss_max,
        bench,
        stalled,
    })
}

fn sample_max(p: Option<Proc>, max: &mut Option<u64>) {
    if let Some(s) = p.and_then(Proc::sample) {
        *max = Some(max.map_or(s.rss_kib, |m| m.max(s.rss_kib)));
    }
}

/// Waits for every client task (each ends by its own deadline).
pub async fn collect(handles: Vec<tokio::task::JoinHandle<Outcome>>) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(o) = h.await {
            out.push(o);
        }
    }
    out
}
