//! Prometheus for the local fleet: what `refleet up` serves at `/metrics` and
//! `/v1/prometheus/targets`, and the scrape config `refleet up --print-scrape-config` prints.
//!
//! The targets are labelled the way a cluster's ServiceMonitor / PodMonitor label them (see
//! docs/observability.md), so the dashboards and alert rules under `dashboards/` mean the
//! same thing locally and in a cluster:
//!
//! | label | refleet up itself | a reflector child |
//! |---|---|---|
//! | `job` | `refleet-operator` | `refleet-reflector` |
//! | `namespace` | `local` | its pool's namespace |
//! | `pod` | `refleet-up` | the reflector's name (`local-a-1`) |
//! | `region` | — | its region |
//!
//! Both jobs scrape with `honor_labels: true`, as the ServiceMonitor does: a series' own
//! `namespace` (the operator's per-pool and per-Session metrics) and `region` (the router's
//! metrics, the reflector's `refleet_build_info`) win over the target's.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;

use super::fleet::Status;
use crate::metrics::OperatorMetrics;

/// The job of the operator (`refleet up` itself locally): same name as in a cluster.
pub const OPERATOR_JOB: &str = "refleet-operator";
/// The job of the reflectors: same name as in a cluster.
pub const REFLECTOR_JOB: &str = "refleet-reflector";
/// The path of the HTTP service-discovery endpoint.
pub const TARGETS_PATH: &str = "/v1/prometheus/targets";
/// The `namespace` label of `refleet up`'s own target (a cluster has the operator pod's).
pub const LOCAL_NAMESPACE: &str = "local";
/// The `pod` label of `refleet up`'s own target.
pub const LOCAL_POD: &str = "refleet-up";
/// How often the printed config scrapes and refreshes its targets.
pub const SCRAPE_INTERVAL: &str = "5s";
/// The text exposition content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders every registry `refleet up` exports as one text exposition: the operator's
/// metrics and whatever else is registered (the router's). Families of the same name in
/// two registries are merged, so the exposition never repeats a `# TYPE` line.
#[derive(Clone, Default)]
pub struct Exporter {
    registries: Arc<RwLock<Vec<Registry>>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    /// An exporter of the operator's metrics.
    pub fn new(metrics: &OperatorMetrics) -> Self {
        let exporter = Self::default();
        exporter.register(metrics.registry.clone());
        exporter
    }

    /// Adds a registry to what `/metrics` serves.
    pub fn register(&self, registry: Registry) {
        self.registries
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(registry);
    }

    /// The text exposition of every registered metric.
    pub fn render(&self) -> String {
        let mut families: BTreeMap<String, prometheus::proto::MetricFamily> = BTreeMap::new();
        let registries = self
            .registries
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for registry in registries.iter() {
            for family in registry.gather() {
                match families.get_mut(family.name()) {
                    Some(existing) => existing.mut_metric().extend(family.get_metric().to_vec()),
                    None => {
                        families.insert(family.name().to_owned(), family);
                    }
                }
            }
        }
        let families: Vec<_> = families.into_values().collect();
        let mut buf = Vec::new();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// What the `/metrics` and `/v1/prometheus/targets` routes of `refleet up` need.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// What `/metrics` renders.
    pub exporter: Exporter,
    /// `host:port` at which Prometheus scrapes `refleet up` itself.
    pub address: String,
}

impl Endpoint {
    /// The endpoint of a `refleet up` bound at `bound`.
    pub fn new(exporter: Exporter, bound: SocketAddr) -> Self {
        Self {
            exporter,
            address: scrape_address(bound),
        }
    }
}

/// One group of Prometheus HTTP service discovery: targets sharing labels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetGroup {
    /// `host:port` of each target.
    pub targets: Vec<String>,
    /// Labels of every target of the group.
    pub labels: BTreeMap<String, String>,
}

/// The targets of the local fleet: `refleet up` itself (at `address`), then every reflector
/// that is live (has a URL: ready or draining), each in a group of its own. `job` keeps one
/// job's targets only.
pub fn targets(address: &str, status: &Status, job: Option<&str>) -> Vec<TargetGroup> {
    let mut groups = Vec::new();
    if job.is_none_or(|j| j == OPERATOR_JOB) {
        groups.push(TargetGroup {
            targets: vec![address.to_owned()],
            labels: labels(&[
                ("job", OPERATOR_JOB),
                ("namespace", LOCAL_NAMESPACE),
                ("pod", LOCAL_POD),
            ]),
        });
    }
    if job.is_none_or(|j| j == REFLECTOR_JOB) {
        for region in &status.regions {
            let namespace = region.pool.split_once('/').map_or("default", |(ns, _)| ns);
            for r in &region.reflectors {
                let Some(target) = r.url.as_deref().and_then(host_port) else {
                    continue;
                };
                groups.push(TargetGroup {
                    targets: vec![target],
                    labels: labels(&[
                        ("job", REFLECTOR_JOB),
                        ("namespace", namespace),
                        ("pod", &r.name),
                        ("region", &region.name),
                    ]),
                });
            }
        }
    }
    groups
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `host:port` of an `http://host:port/...` URL.
fn host_port(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// The address Prometheus reaches a server bound at `bound` by: an unspecified address
/// (`0.0.0.0`, `[::]`) becomes loopback.
pub fn scrape_address(bound: SocketAddr) -> String {
    let ip = match bound.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    SocketAddr::new(ip, bound.port()).to_string()
}

/// Why a scrape config cannot be printed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScrapeConfigError {
    /// The listen port is 0: the real one is only known once `refleet up` runs.
    #[error(
        "refleet up listens on port 0 (a free port chosen at start), so a scrape config cannot name it: set a fixed port with --listen or the config's `listen`"
    )]
    PortZero,
}

/// A complete Prometheus configuration that scrapes the local fleet of a `refleet up`
/// listening at `listen`: one job per component, named as in a cluster, each discovering
/// its targets from `refleet up`'s `/v1/prometheus/targets`.
pub fn scrape_config(listen: SocketAddr) -> Result<String, ScrapeConfigError> {
    if listen.port() == 0 {
        return Err(ScrapeConfigError::PortZero);
    }
    let address = scrape_address(listen);
    let mut out = format!(
        "# Prometheus configuration for the local fleet of `refleet up` at http://{address}/\n\
         # (printed by `refleet up --print-scrape-config`). Targets come from refleet up's HTTP\n\
         # service discovery with the labels job, namespace, pod and region, as a cluster's\n\
         # ServiceMonitor/PodMonitor sets them (docs/observability.md), so the dashboards and\n\
         # alert rules under dashboards/ work unchanged. Add `rule_files:` to load the rules.\n\
         global:\n\
         \x20 scrape_interval: {SCRAPE_INTERVAL}\n\
         \x20 evaluation_interval: {SCRAPE_INTERVAL}\n\
         scrape_configs:\n"
    );
    for job in [OPERATOR_JOB, REFLECTOR_JOB] {
        out.push_str(&format!(
            "  - job_name: {job}\n\
             \x20   honor_labels: true\n\
             \x20   metrics_path: /metrics\n\
             \x20   http_sd_configs:\n\
             \x20     - url: http://{address}{TARGETS_PATH}?job={job}\n\
             \x20       refresh_interval: {SCRAPE_INTERVAL}\n"
        ));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::local::fleet::{ReflectorView, RegionView};

    fn reflector(name: &str, state: &'static str, url: Option<&str>) -> ReflectorView {
        ReflectorView {
            name: name.into(),
            pid: None,
            cpu_percent: None,
            rss_bytes: None,
            state,
            url: url.map(Into::into),
            files_url: "http://127.0.0.1:7080/files".into(),
            users: 0,
            shards: vec![],
        }
    }

    fn status() -> Status {
        Status {
            regions: vec![
                RegionView {
                    pool: "team/local".into(),
                    name: "local-a".into(),
                    desired: 1,
                    reflectors: vec![
                        reflector("local-a-1", "Ready", Some("http://127.0.0.1:40441/")),
                        reflector("local-a-2", "Starting", None),
                        reflector("local-a-3", "Draining", Some("http://127.0.0.1:40443/")),
                    ],
                },
                RegionView {
                    pool: "team/local".into(),
                    name: "local-b".into(),
                    desired: 1,
                    reflectors: vec![reflector("local-b-1", "Ready", Some("http://[::1]:5000/"))],
                },
            ],
            ..Status::default()
        }
    }

    #[test]
    fn targets_list_refleet_up_and_every_live_reflector_with_the_cluster_labels() {
        let groups = targets("127.0.0.1:7080", &status(), None);
        let json = serde_json::to_value(&groups).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"targets": ["127.0.0.1:7080"],
                 "labels": {"job": "refleet-operator", "namespace": "local", "pod": "refleet-up"}},
                {"targets": ["127.0.0.1:40441"],
                 "labels": {"job": "refleet-reflector", "namespace": "team", "pod": "local-a-1", "region": "local-a"}},
                {"targets": ["127.0.0.1:40443"],
                 "labels": {"job": "refleet-reflector", "namespace": "team", "pod": "local-a-3", "region": "local-a"}},
                {"targets": ["[::1]:5000"],
                 "labels": {"job": "refleet-reflector", "namespace": "team", "pod": "local-b-1", "region": "local-b"}},
            ])
        );
        let reflectors = targets("127.0.0.1:7080", &status(), Some(REFLECTOR_JOB));
        assert_eq!(reflectors.len(), 3);
        assert!(reflectors.iter().all(|g| g.labels["job"] == REFLECTOR_JOB));
        let operator = targets("127.0.0.1:7080", &status(), Some(OPERATOR_JOB));
        assert_eq!(operator.len(), 1);
        assert!(targets("x:1", &status(), Some("other")).is_empty());
    }

    #[test]
    fn the_scrape_config_discovers_both_jobs_from_refleet_up() {
        let text = scrape_config("0.0.0.0:7080".parse().unwrap()).unwrap();
        let config: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(config["global"]["scrape_interval"], SCRAPE_INTERVAL);
        let jobs = config["scrape_configs"].as_array().unwrap();
        let names: Vec<&str> = jobs
            .iter()
            .map(|j| j["job_name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [OPERATOR_JOB, REFLECTOR_JOB]);
        for job in jobs {
            let name = job["job_name"].as_str().unwrap();
            assert_eq!(job["honor_labels"], true);
            assert_eq!(job["metrics_path"], "/metrics");
            let sd = job["http_sd_configs"].as_array().unwrap();
            assert_eq!(sd.len(), 1);
            assert_eq!(
                sd[0]["url"],
                format!("http://127.0.0.1:7080/v1/prometheus/targets?job={name}")
            );
        }
        let v6 = scrape_config("[::]:9000".parse().unwrap()).unwrap();
        assert!(v6.contains("url: http://[::1]:9000/v1/prometheus/targets?job=refleet-reflector"));
        assert_eq!(
            scrape_config("127.0.0.1:0".parse().unwrap()),
            Err(ScrapeConfigError::PortZero)
        );
    }

    #[tokio::test]
    async fn refleet_up_serves_the_targets_and_the_metrics() {
        use crate::local::server::{Published, Server};
        let metrics = OperatorMetrics::new();
        metrics.set_leader(true);
        let shared = Arc::new(RwLock::new(Published {
            status: status(),
            live: vec![],
        }));
        let storage = refleet_files::storage::Storage::open("memory://").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bound = listener.local_addr().unwrap();
        let base = format!("http://{bound}");
        let mut server = Server::new(shared, storage, 1024, crate::local::server::http_client());
        let without = server.clone().router();
        server.prometheus = Some(Endpoint::new(Exporter::new(&metrics), bound));
        let serving = tokio::spawn(async move { axum::serve(listener, server.router()).await });
        let http = reqwest::Client::new();

        let res = http
            .get(format!("{base}{TARGETS_PATH}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        let all: serde_json::Value = res.json().await.unwrap();
        assert_eq!(all.as_array().unwrap().len(), 4, "{all}");
        assert_eq!(all[0]["targets"][0], bound.to_string());
        assert_eq!(all[0]["labels"]["job"], OPERATOR_JOB);
        let res = http
            .get(format!("{base}{TARGETS_PATH}?job=refleet-reflector"))
            .send()
            .await
            .unwrap();
        let reflectors: Vec<serde_json::Value> = res.json().await.unwrap();
        let pods: Vec<&str> = reflectors
            .iter()
            .map(|g| g["labels"]["pod"].as_str().unwrap())
            .collect();
        assert_eq!(pods, ["local-a-1", "local-a-3", "local-b-1"]);

        let res = http.get(format!("{base}/metrics")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], CONTENT_TYPE);
        let text = res.text().await.unwrap();
        assert!(text.contains("refleet_operator_leader 1"), "{text}");
        serving.abort();

        // A server without an endpoint has neither route.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let serving = tokio::spawn(async move { axum::serve(listener, without).await });
        for path in ["/metrics", TARGETS_PATH] {
            let res = http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(res.status(), 404, "{path}");
        }
        serving.abort();
    }

    #[test]
    fn the_exporter_merges_families_of_the_same_name() {
        let metrics = OperatorMetrics::new();
        let exporter = Exporter::new(&metrics);
        let other = Registry::new();
        let info = prometheus::IntGaugeVec::new(
            prometheus::Opts::new("refleet_build_info", "Build information."),
            &["version"],
        )
        .unwrap();
        other.register(Box::new(info.clone())).unwrap();
        info.with_label_values(&["router"]).set(1);
        exporter.register(other);
        let text = exporter.render();
        assert_eq!(
            text.matches("# TYPE refleet_build_info gauge").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("refleet_build_info{version=\"router\"} 1"),
            "{text}"
        );
        assert!(text.contains("refleet_operator_leader 0"), "{text}");
    }
}
