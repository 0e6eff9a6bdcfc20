//! The gateway's metrics. Labels have bounded values: the gateway's region, the upgrade
//! outcomes in [`OUTCOMES`], and the two splice directions.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// How an upgrade request ended (`refleet_gateway_upgrades_total{outcome}`).
pub const OUTCOMES: &[&str] = &[
    // Spliced to the shard's reflector.
    "proxied",
    // The join token is missing, forged, for an unknown key or expired (401/403).
    "bad_token",
    // No such shard (404).
    "not_found",
    // The shard's reflector is not ready (503).
    "not_ready",
    // The shard is moving to another reflector (503).
    "moving",
    // The reflector could not be reached or refused the upgrade (502 or its own status).
    "upstream_error",
    // Not a WebSocket upgrade of a `/<token>/<session>` path (400).
    "bad_request",
];

/// Gateway metrics, shared by every gateway of a process (one per region in `refleet up`).
#[derive(Clone, Debug)]
pub struct GatewayMetrics {
    connections: IntGaugeVec,
    upgrades: IntCounterVec,
    bytes: IntCounterVec,
    connect: HistogramVec,
    /// Entries of the placement table (`refleet_gateway_placements`).
    pub placements: IntGauge,
    /// 1 while the placement watch stream is connected (`refleet_gateway_watch_connected`).
    pub watch_connected: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("unique metric name");
    c
}

impl GatewayMetrics {
    /// Registers the gateway metrics in `registry`.
    ///
    /// # Panics
    /// When they are already registered there (a programming error).
    pub fn new(registry: &Registry) -> Self {
        Self {
            connections: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "refleet_gateway_connections",
                        "WebSocket connections the gateway is splicing now.",
                    ),
                    &["region"],
                )
                .expect("valid metric"),
            ),
            upgrades: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "refleet_gateway_upgrades_total",
                        "Upgrade requests by outcome (proxied, bad_token, not_found, not_ready, moving, upstream_error, bad_request).",
                    ),
                    &["region", "outcome"],
                )
                .expect("valid metric"),
            ),
            bytes: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "refleet_gateway_bytes_total",
                        "Bytes spliced after the upgrade, by direction (to_reflector, to_client).",
                    ),
                    &["region", "direction"],
                )
                .expect("valid metric"),
            ),
            connect: register(
                registry,
                HistogramVec::new(
                    HistogramOpts::new(
                        "refleet_gateway_upstream_connect_seconds",
                        "Time from a valid upgrade request to the reflector's 101 answer.",
                    )
                    .buckets(vec![
                        0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ]),
                    &["region"],
                )
                .expect("valid metric"),
            ),
            placements: register(
                registry,
                IntGauge::new(
                    "refleet_gateway_placements",
                    "Shards in the gateway's placement table.",
                )
                .expect("valid metric"),
            ),
            watch_connected: register(
                registry,
                IntGauge::new(
                    "refleet_gateway_watch_connected",
                    "1 while the placement watch stream to the router is connected (always 1 in-process).",
                )
                .expect("valid metric"),
            ),
        }
    }

    /// The metrics of one region's gateway, every label value present from the start.
    pub fn region(&self, region: &str) -> RegionMetrics {
        for o in OUTCOMES {
            self.upgrades.with_label_values(&[region, o]);
        }
        RegionMetrics {
            connections: self.connections.with_label_values(&[region]),
            upgrades: OUTCOMES
                .iter()
                .map(|o| self.upgrades.with_label_values(&[region, o]))
                .collect(),
            to_reflector: self.bytes.with_label_values(&[region, "to_reflector"]),
            to_client: self.bytes.with_label_values(&[region, "to_client"]),
            connect: self.connect.with_label_values(&[region]),
        }
    }
}

/// One region's gateway metrics, resolved once (no label lookups per connection).
#[derive(Clone, Debug)]
pub struct RegionMetrics {
    /// Open spliced connections.
    pub connections: IntGauge,
    upgrades: Vec<IntCounter>,
    /// Bytes from clients to reflectors.
    pub to_reflector: IntCounter,
    /// Bytes from reflectors to clients.
    pub to_client: IntCounter,
    /// Upstream connect + upgrade time.
    pub connect: Histogram,
}

impl RegionMetrics {
    /// Counts one upgrade request ending with `outcome` (one of [`OUTCOMES`]).
    pub fn upgrade(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.upgrades[i].inc();
        }
    }

    /// Upgrade requests that ended with `outcome` so far.
    pub fn upgrades(&self, outcome: &str) -> u64 {
        OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.upgrades[i].get())
    }
}
