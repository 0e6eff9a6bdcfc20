//! Half-open upgrades against a gateway (`--front gateway half-open`): many connections that
//! send the start of an upgrade request and never finish it (a slowloris crowd). What it
//! costs the gateway in memory while they hang, whether a real client still gets through
//! meanwhile, and whether the gateway closes every one of them at its header timeout and
//! gives the memory back.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::load::Endpoint;
use crate::procstat::Proc;

/// What to run.
#[derive(Debug, Clone)]
pub struct HalfOpenSpec {
    /// Half-open connections held at once.
    pub connections: usize,
    /// Connections opened concurrently while building the crowd.
    pub concurrency: usize,
    /// Pause after the crowd is up, before RSS is read.
    pub settle: Duration,
    /// How long the gateway may take to close them all (its header timeout plus slack).
    pub close_within: Duration,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct HalfOpenReport {
    pub connections: usize,
    /// Connections the crowd could not open (refused or reset before the head was sent).
    pub open_failures: usize,
    pub gateway_rss_before_kib: Option<u64>,
    pub gateway_rss_during_kib: Option<u64>,
    pub gateway_rss_after_kib: Option<u64>,
    /// (during − before) ÷ connections.
    pub rss_per_half_open_kib: Option<f64>,
    /// A real WebSocket upgrade through the gateway while the crowd hangs: how long it took.
    pub upgrade_during_ms: Option<f64>,
    /// Why it failed, if it did.
    pub upgrade_error: Option<String>,
    /// Half-open connections the gateway closed within `close_within`.
    pub closed_by_gateway: usize,
    /// Time from the crowd being up to the last one closed, s.
    pub all_closed_after_s: Option<f64>,
    /// Whether any of them got anything but a close (an answer to a head never finished).
    pub answered: usize,
}

impl HalfOpenReport {
    pub fn passed(&self) -> bool {
        self.open_failures == 0
            && self.upgrade_error.is_none()
            && self.closed_by_gateway == self.connections
            && self.answered == 0
    }
}

impl std::fmt::Display for HalfOpenReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kib = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        writeln!(
            f,
            "{} half-open upgrades held ({} could not open)",
            self.connections, self.open_failures
        )?;
        writeln!(
            f,
            "gateway RSS: {} KiB before, {} KiB with the crowd, {} KiB after it was closed",
            kib(self.gateway_rss_before_kib),
            kib(self.gateway_rss_during_kib),
            kib(self.gateway_rss_after_kib)
        )?;
        if let Some(k) = self.rss_per_half_open_kib {
            writeln!(f, "gateway RSS per half-open connection: {k:.2} KiB")?;
        }
        match (&self.upgrade_error, self.upgrade_during_ms) {
            (Some(e), _) => writeln!(f, "a real upgrade during the crowd: FAILED ({e})")?,
            (None, Some(ms)) => writeln!(f, "a real upgrade during the crowd: 101 in {ms:.1} ms")?,
            (None, None) => {}
        }
        writeln!(
            f,
            "closed by the gateway: {} of {} (last after {}), answered instead of closed: {}",
            self.closed_by_gateway,
            self.connections,
            self.all_closed_after_s
                .map_or("?".to_owned(), |s| format!("{s:.1} s")),
            self.answered
        )
    }
}

/// Runs the crowd against `ep` (a gateway: `ep.reflector` is the gateway's process).
pub async fn run(ep: &Endpoint, spec: &HalfOpenSpec) -> anyhow::Result<HalfOpenReport> {
    let path = ep
        .ws_base
        .strip_prefix("ws://")
        .and_then(|r| r.find('/').map(|i| &r[i..]))
        .context("URL is not ws://HOST:PORT/...")?
        .to_owned();
    let rss = || ep.reflector.and_then(Proc::sample).map(|s| s.rss_kib);
    let before = rss();

    // The crowd: each sends the start of an upgrade head and stops there.
    let gate = std::sync::Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let opens = (0..spec.connections).map(|i| {
        let (gate, head) = (gate.clone(), half_head(&path, i));
        let server = ep.server;
        async move {
            let _permit = gate.acquire().await.ok()?;
            let mut tcp = TcpStream::connect(server).await.ok()?;
            tcp.write_all(head.as_bytes()).await.ok()?;
            Some(tcp)
        }
    });
    let crowd: Vec<Option<TcpStream>> = futures_util::future::join_all(opens).await;
    let up = Instant::now();
    let open_failures = crowd.iter().filter(|c| c.is_none()).count();
    tokio::time::sleep(spec.settle).await;
    let during = rss();

    // A real client still gets its upgrade.
    let started = Instant::now();
    let url = format!("{}halfopen-probe", ep.ws_base);
    let upgrade = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await;
    let (upgrade_during_ms, upgrade_error) = match upgrade {
        Ok(Ok((mut ws, _))) => {
            let _ = ws.close(None).await;
            (Some(started.elapsed().as_secs_f64() * 1000.0), None)
        }
        Ok(Err(e)) => (None, Some(e.to_string())),
        Err(_) => (None, Some("no answer within 10 s".to_owned())),
    };

    // Every one is closed by the gateway, with nothing sent first.
    let waits = crowd.into_iter().flatten().map(|mut tcp| async move {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(spec.close_within, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => Some((true, Instant::now())),
            Ok(Ok(_)) => Some((false, Instant::now())),
            Err(_) => None,
        }
    });
    let ends: Vec<Option<(bool, Instant)>> = futures_util::future::join_all(waits).await;
    let closed_by_gateway = ends.iter().flatten().filter(|(clean, _)| *clean).count();
    let answered = ends.iter().flatten().filter(|(clean, _)| !clean).count();
    let all_closed_after_s = (closed_by_gateway + answered == ends.len())
        .then(|| ends.iter().flatten().map(|(_, at)| *at).max())
        .flatten()
        .map(|last| last.duration_since(up).as_secs_f64());
    // Let the allocator settle before the last reading.
    tokio::time::sleep(spec.settle).await;
    let after = rss();

    let per = match (before, during) {
        (Some(b), Some(d)) if spec.connections > 0 => {
            Some((d as f64 - b as f64) / spec.connections as f64)
        }
        _ => None,
    };
    Ok(HalfOpenReport {
        connections: spec.connections,
        open_failures,
        gateway_rss_before_kib: before,
        gateway_rss_during_kib: during,
        gateway_rss_after_kib: after,
        rss_per_half_open_kib: per,
        upgrade_during_ms,
        upgrade_error,
        closed_by_gateway,
        all_closed_after_s,
        answered,
    })
}

/// The unfinished head of connection `i`: request line and a few headers, no blank line.
fn half_head(path: &str, i: usize) -> String {
    format!(
        "GET {path}halfopen-{i} HTTP/1.1\r\nHost: gateway\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_head_never_ends() {
        let h = half_head("/tok/", 7);
        assert!(h.starts_with("GET /tok/halfopen-7 HTTP/1.1\r\n"));
        assert!(!h.contains("\r\n\r\n"), "no blank line ends it");
    }

    #[test]
    fn a_run_passes_only_when_every_connection_was_closed_unanswered() {
        let mut r = HalfOpenReport {
            connections: 2,
            open_failures: 0,
            gateway_rss_before_kib: Some(1),
            gateway_rss_during_kib: Some(2),
            gateway_rss_after_kib: Some(1),
            rss_per_half_open_kib: Some(0.5),
            upgrade_during_ms: Some(1.0),
            upgrade_error: None,
            closed_by_gateway: 2,
            all_closed_after_s: Some(10.0),
            answered: 0,
        };
        assert!(r.passed());
        r.closed_by_gateway = 1;
        assert!(!r.passed(), "one left open");
        r.closed_by_gateway = 2;
        r.upgrade_error = Some("503".into());
        assert!(!r.passed(), "the real client was turned away");
    }
}
