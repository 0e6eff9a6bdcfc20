//! The real `refleet operator` processes (two replicas on one Lease) and what is read from
//! them and from the apiserver: leader, `/metrics`, CPU and RSS from `/proc`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

/// One operator replica.
pub struct Operator {
    pub identity: String,
    pub metrics: SocketAddr,
    pub router: SocketAddr,
    pub report: SocketAddr,
    child: Option<tokio::process::Child>,
    args: Vec<String>,
    bin: PathBuf,
    kubeconfig: PathBuf,
    log: PathBuf,
}

/// A loopback port free now, below Linux's default ephemeral range (32768–60999): the rig
/// opens thousands of outgoing connections, and a port the kernel handed out as ephemeral
/// could be some connection's local port by the time a replica binds it (a standby once
/// failed to start on `Address already in use` that way).
pub fn free_port() -> anyhow::Result<u16> {
    use rand::Rng;
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port in 20000..32000 after 200 tries")
}

/// Settings shared by the replicas.
pub struct OperatorSettings {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    pub namespace: String,
    pub lease_namespace: String,
    pub api_keys_dir: PathBuf,
    pub lease_duration: String,
    pub token_ttl: String,
    pub out: PathBuf,
}

impl Operator {
    pub fn new(s: &OperatorSettings, index: usize) -> anyhow::Result<Self> {
        let loopback = |p| SocketAddr::from(([127, 0, 0, 1], p));
        let (metrics, router, report) = (
            loopback(free_port()?),
            loopback(free_port()?),
            loopback(free_port()?),
        );
        let identity = format!("scale-operator-{index}");
        let args = vec![
            "operator".into(),
            "--namespaces".into(),
            s.namespace.clone(),
            "--lease-namespace".into(),
            s.lease_namespace.clone(),
            "--identity".into(),
            identity.clone(),
            "--lease-duration".into(),
            s.lease_duration.clone(),
            "--metrics-listen".into(),
            metrics.to_string(),
            "--router-listen".into(),
            router.to_string(),
            "--report-listen".into(),
            report.to_string(),
            // What the pods are told; the simulator reaches whichever replica leads (as the
            // report Service selecting the leader pod would).
            "--reflector-report-url".into(),
            "http://refleet-report.refleet-system.svc:8081".into(),
            "--report-secret".into(),
            "refleet-report-key".into(),
            "--token-secret".into(),
            "refleet-join-token".into(),
            "--api-keys-dir".into(),
            s.api_keys_dir.display().to_string(),
            // One API key stands for the game backends of every simulated user.
            "--route-rate-limit".into(),
            "1000000".into(),
            "--token-ttl".into(),
            s.token_ttl.clone(),
            "--log-format".into(),
            "json".into(),
        ];
        Ok(Self {
            identity: identity.clone(),
            metrics,
            router,
            report,
            child: None,
            args,
            bin: s.bin.clone(),
            kubeconfig: s.kubeconfig.clone(),
            log: s.out.join(format!("{identity}.log")),
        })
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = tokio::process::Command::new(&self.bin)
            .args(&self.args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("REFLEET_SCALE_OPERATOR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// How the replica's process ended, if it ended on its own (not by [`Self::kill`]).
    pub fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        Some(status.to_string())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    /// SIGKILL: a crash, so the Lease is not released and the standby waits it out.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    pub async fn metrics_text(&self) -> Option<String> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .ok()?;
        client
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    pub async fn is_leader(&self) -> bool {
        self.metrics_text()
            .await
            .and_then(|t| metric(&t, "refleet_operator_leader", &[]))
            == Some(1.0)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// The value of the series `name` whose labels include all of `labels` (summed over the
/// matching series).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let (label_part, value) = match rest.rfind(' ') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => continue,
        };
        if !labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// Quantile `q` of a Prometheus histogram `name` (cumulative `_bucket` series summed over
/// every label set), by linear interpolation inside the bucket.
pub fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket{{");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(&bucket)) {
        let le = line.split("le=\"").nth(1)?.split('"').next()?;
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let v: f64 = line.rsplit(' ').next()?.parse().ok()?;
        let key = if bound.is_infinite() {
            u64::MAX
        } else {
            (bound * 1e9) as u64
        };
        let e = by_le.entry(key).or_insert((bound, 0.0));
        e.1 += v;
    }
    let total = by_le.values().last()?.1;
    if total <= 0.0 {
        return None;
    }
    let want = q * total;
    let mut prev = (0.0, 0.0);
    for (bound, count) in by_le.values() {
        if *count >= want {
            if bound.is_infinite() {
                return Some(prev.0);
            }
            let span = count - prev.1;
            let frac = if span > 0.0 {
                (want - prev.1) / span
            } else {
                1.0
            };
            return Some(prev.0 + (bound - prev.0) * frac);
        }
        prev = (*bound, *count);
    }
    None
}

/// apiserver requests by verb (and by resource for the refleet ones), from
/// `apiserver_request_total`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApiserverRequests {
    pub by_verb: BTreeMap<String, f64>,
    pub by_resource_verb: BTreeMap<String, f64>,
}

pub fn apiserver_requests(text: &str) -> ApiserverRequests {
    let mut out = ApiserverRequests::default();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let label = |k: &str| {
            rest.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        *out.by_verb.entry(label("verb")).or_default() += v;
        let resource = label("resource");
        let sub = label("subresource");
        let key = if sub.is_empty() {
            format!("{resource} {}", label("verb"))
        } else {
            format!("{resource}/{sub} {}", label("verb"))
        };
        *out.by_resource_verb.entry(key).or_default() += v;
    }
    out
}

impl ApiserverRequests {
    /// Per second between `self` (earlier) and `later`.
    pub fn rate(&self, later: &Self, secs: f64) -> Self {
        let diff = |a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>| {
            b.iter()
                .map(|(k, v)| (k.clone(), (v - a.get(k).copied().unwrap_or(0.0)) / secs))
                .filter(|(_, v)| *v > 0.0)
                .map(|(k, v)| (k, (v * 100.0).round() / 100.0))
                .collect()
        };
        Self {
            by_verb: diff(&self.by_verb, &later.by_verb),
            by_resource_verb: diff(&self.by_resource_verb, &later.by_resource_verb),
        }
    }
}

/// The apiserver's audit log (one JSON event per line), counted by user agent, verb and
/// resource for requests of `user` between `from` and `to` (RFC 3339 strings compare in
/// order when they share a format, which the apiserver's do).
pub fn audit_counts(
    path: &Path,
    user: &str,
    from: &str,
    to: &str,
) -> anyhow::Result<BTreeMap<String, u64>> {
    use std::io::BufRead as _;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        let Ok(e) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if e["stage"] != "ResponseComplete" && e["stage"] != "ResponseStarted" {
            continue;
        }
        // A watch is logged at ResponseStarted and again at ResponseComplete: count it once.
        if e["stage"] == "ResponseComplete" && e["verb"] == "watch" {
            continue;
        }
        if e["stage"] == "ResponseStarted" && e["verb"] != "watch" {
            continue;
        }
        if e["user"]["username"] != user {
            continue;
        }
        let at = e["requestReceivedTimestamp"].as_str().unwrap_or_default();
        if at < from || at > to {
            continue;
        }
        let agent = match e["userAgent"].as_str().unwrap_or_default() {
            "" => "(no user agent)".to_owned(),
            ua => ua.split('/').next().unwrap_or_default().to_owned(),
        };
        let resource = e["objectRef"]["resource"].as_str().unwrap_or_default();
        let sub = e["objectRef"]["subresource"].as_str().unwrap_or_default();
        let res = if sub.is_empty() {
            resource.to_owned()
        } else {
            format!("{resource}/{sub}")
        };
        let verb = e["verb"].as_str().unwrap_or_default();
        *out.entry(format!("{agent} {verb} {res}")).or_default() += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn metrics_and_histograms_are_read() {
        let text = "a_total{x=\"1\"} 2\na_total{x=\"2\"} 3\nab 7\n\
                    h_bucket{le=\"0.1\"} 50\nh_bucket{le=\"1\"} 100\nh_bucket{le=\"+Inf\"} 100\n";
        assert_eq!(metric(text, "a_total", &[]), Some(5.0));
        assert_eq!(metric(text, "a_total", &[("x", "2")]), Some(3.0));
        assert_eq!(metric(text, "a", &[]), None);
        let p50 = histogram_quantile(text, "h", 0.5).unwrap();
        assert!((p50 - 0.1).abs() < 1e-9, "{p50}");
        let p75 = histogram_quantile(text, "h", 0.75).unwrap();
        assert!((p75 - 0.55).abs() < 1e-9, "{p75}");
    }

    #[test]
    fn apiserver_requests_are_summed_by_verb() {
        let a = apiserver_requests(
            "apiserver_request_total{code=\"200\",resource=\"pods\",subresource=\"\",verb=\"WATCH\"} 4\n\
             apiserver_request_total{code=\"200\",resource=\"pods\",subresource=\"status\",verb=\"PATCH\"} 6\n",
        );
        assert_eq!(a.by_verb["WATCH"], 4.0);
        assert_eq!(a.by_resource_verb["pods/status PATCH"], 6.0);
    }
}
