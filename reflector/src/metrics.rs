//! Prometheus metrics of one reflector process.
//!
//! Every label has a small fixed set of values (action, close reason, method, …); nothing is
//! labelled by session, user or path, so the series count is bounded whatever the load.
//! Per-session figures travel to the operator over the report stream instead. Every labelled
//! series is created at start-up so dashboards and alerts see a 0 before the first event.

use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use refleet_files::metrics::{FilesMetrics, counter_vec, gauge};

use crate::outbox::QueuePeak;

/// The client actions counted separately in `refleet_reflector_messages_received_total`.
pub const ACTIONS: &[&str] = &[
    "JOIN", "SEND", "TUTTI", "SNAP", "SAVE", "TICKS", "PING", "PULSE", "LOG", "unknown",
];

/// Close reasons (see [`crate::close::Close::label`]).
pub const CLOSE_LABELS: &[&str] = &[
    "normal",
    "protocol_error",
    "invalid_payload",
    "too_big",
    "unknown_session",
    "unresponsive",
    "inactive",
    "reconnect",
    "outdated_protocol",
    "bad_app_id",
    "malformed",
    "bad_api_key",
    "rate_limited",
    "session_full",
    "internal",
    "never_joined",
    "other",
];

/// All metrics of the reflector, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// WebSocket connections accepted since start.
    pub connections_total: IntCounter,
    /// Sessions held in memory.
    pub sessions: IntGauge,
    /// Clients that have received their SYNC and are members of a session.
    pub users: IntGauge,
    /// Users that joined a session (SYNC sent).
    pub joins_total: IntCounter,
    /// Users that left a session (after their leave delay).
    pub leaves_total: IntCounter,
    /// Frames received from clients, by action (one resolved counter per entry of [`ACTIONS`],
    /// so counting a frame is one atomic add, not a label look-up).
    messages_received: Vec<IntCounter>,
    /// Messages stamped and reflected (client SENDs, users and tally messages).
    pub messages_reflected_total: IntCounter,
    /// Frames delivered into client send queues (RECV and TICK fan-out).
    pub deliveries_total: IntCounter,
    /// TICK messages sent to clients.
    pub ticks_total: IntCounter,
    /// Bytes received in text frames.
    pub bytes_received_total: IntCounter,
    /// Bytes queued for sending in text frames.
    pub bytes_sent_total: IntCounter,
    /// Frames that did not fit a client's full send queue (the client is then disconnected).
    pub send_queue_drops_total: IntCounter,
    /// Clients disconnected because they did not keep up.
    pub slow_client_disconnects_total: IntCounter,
    /// The largest backlog in bytes of one connection, kept by the send queues themselves.
    pub send_queue_peak: QueuePeak,
    /// `send_queue_peak`, exported when the metrics are rendered.
    send_queue_peak_bytes: IntGauge,
    closes: IntCounterVec,
    snapshots: IntCounterVec,
    persistence: IntCounterVec,
    session_state: IntCounterVec,
    stored_url_refusals: IntCounterVec,
    /// The files endpoint's metrics (requests, bytes, uploads in progress).
    pub files: FilesMetrics,
    /// 1 while the reflector is draining.
    pub draining: IntGauge,
    /// Sessions by lifecycle outcome.
    session_ends: IntCounterVec,
    hand_offs: IntCounterVec,
    checkpoints: IntCounterVec,
    /// JOINs refused by the admission policy, by reason.
    join_refusals: IntCounterVec,
    /// 1 while the load-report stream is open.
    pub report_stream_connected: IntGauge,
}

/// Reasons a SNAP or SAVE URL is not recorded (metric label values).
pub const STORED_URL_REASONS: &[&str] = &[
    "not_member",
    "foreign_base",
    "bad_path",
    "foreign_prefix",
    "no_identity",
];

/// Reasons a JOIN is refused by the admission policy (metric label values).
pub const REFUSAL_REASONS: &[&str] = &[
    "missing_token",
    "invalid_token",
    "expired_token",
    "wrong_shard",
    "wrong_session",
    "view_taken",
    "shard_full",
    "shard_moved",
];

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric name");
    c
}

impl Metrics {
    /// Creates and registers every metric; `region` is exported in `refleet_build_info`.
    pub fn new(region: &str) -> Self {
        let registry = Registry::new();
        let info = IntGaugeVec::new(
            Opts::new(
                "refleet_build_info",
                "Build and placement information; the value is always 1.",
            ),
            &["component", "version", "region"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(info.clone()))
            .expect("unique metric name");
        info.with_label_values(&["reflector", env!("CARGO_PKG_VERSION"), region])
            .set(1);
        let r = &registry;
        Self {
            connections: gauge(
                r,
                "refleet_reflector_connections",
                "Open WebSocket connections.",
            ),
            connections_total: counter(
                r,
                "refleet_reflector_connections_total",
                "WebSocket connections accepted since start.",
            ),
            sessions: gauge(
                r,
                "refleet_reflector_sessions",
                "Sessions held in memory by this reflector.",
            ),
            users: gauge(
                r,
                "refleet_reflector_users",
                "Clients that are members of a session on this reflector.",
            ),
            joins_total: counter(
                r,
                "refleet_reflector_joins_total",
                "Clients that joined a session (received their SYNC).",
            ),
            leaves_total: counter(
                r,
                "refleet_reflector_leaves_total",
                "Clients that left a session, counted after their leave delay.",
            ),
            messages_received: {
                let v = counter_vec(
                    r,
                    "refleet_reflector_messages_received_total",
                    "Frames received from clients, by protocol action.",
                    &[ACTIONS],
                    &["action"],
                );
                ACTIONS.iter().map(|a| v.with_label_values(&[a])).collect()
            },
            messages_reflected_total: counter(
                r,
                "refleet_reflector_messages_reflected_total",
                "Messages stamped with time and sequence number and reflected to a session.",
            ),
            deliveries_total: counter(
                r,
                "refleet_reflector_deliveries_total",
                "Frames (RECV and TICK) queued for delivery to clients.",
            ),
            ticks_total: counter(
                r,
                "refleet_reflector_ticks_total",
                "TICK messages sent to clients.",
            ),
            bytes_received_total: counter(
                r,
                "refleet_reflector_received_bytes_total",
                "Bytes received from clients in text frames.",
            ),
            bytes_sent_total: counter(
                r,
                "refleet_reflector_sent_bytes_total",
                "Bytes queued for clients in text frames.",
            ),
            send_queue_drops_total: counter(
                r,
                "refleet_reflector_send_queue_drops_total",
                "Frames that did not fit into a client's full send queue.",
            ),
            slow_client_disconnects_total: counter(
                r,
                "refleet_reflector_slow_client_disconnects_total",
                "Clients disconnected because they did not read their frames fast enough.",
            ),
            closes: counter_vec(
                r,
                "refleet_reflector_closes_total",
                "Connections closed by the reflector, by reason.",
                &[CLOSE_LABELS],
                &["reason"],
            ),
            snapshots: counter_vec(
                r,
                "refleet_reflector_snapshots_total",
                "SNAP announcements, by result (accepted, ignored).",
                &[&["accepted", "ignored"]],
                &["result"],
            ),
            persistence: counter_vec(
                r,
                "refleet_reflector_persistence_operations_total",
                "Persisted-data operations: SAVE records stored, look-ups at session start, and SAVEs dropped or look-ups skipped because the shard's Session has persistence off.",
                &[&["save", "lookup_hit", "lookup_miss", "error", "skipped"]],
                &["op"],
            ),
            stored_url_refusals: counter_vec(
                r,
                "refleet_reflector_stored_url_refusals_total",
                "SNAP and SAVE announcements ignored because their URL is not under the session's own files prefix on this files base, or because they did not come from an admitted member.",
                &[&["SNAP", "SAVE"], STORED_URL_REASONS],
                &["action", "reason"],
            ),
            session_state: counter_vec(
                r,
                "refleet_reflector_session_state_operations_total",
                "Stored session state (for resume after a restart), by operation and result.",
                &[&["store", "resume"], &["ok", "error"]],
                &["op", "result"],
            ),
            draining: gauge(
                r,
                "refleet_reflector_draining",
                "1 while the reflector is draining, else 0.",
            ),
            session_ends: counter_vec(
                r,
                "refleet_reflector_session_ends_total",
                "Sessions removed from memory, by cause (empty, drained).",
                &[&["empty", "drained"]],
                &["cause"],
            ),
            hand_offs: counter_vec(
                r,
                "refleet_reflector_hand_offs_total",
                "Shards handed over to another reflector at the operator's request (a move), by \
                 outcome: stored (its sessions were stored and their clients sent on), failed \
                 (storing failed; the shard stays here).",
                &[&["stored", "failed"]],
                &["outcome"],
            ),
            checkpoints: counter_vec(
                r,
                "refleet_reflector_checkpoints_total",
                "Checkpoints of running sessions (--checkpoint-interval), by outcome: stored, \
                 failed (retried next interval), fenced (another reflector took the session \
                 over; this one closed it), resumed (a session resumed from a checkpoint, on a \
                 fresh timeline).",
                &[&["stored", "failed", "fenced", "resumed"]],
                &["outcome"],
            ),
            join_refusals: counter_vec(
                r,
                "refleet_reflector_join_refusals_total",
                "JOINs refused by the admission policy, by reason (join tokens, shard cap).",
                &[REFUSAL_REASONS],
                &["reason"],
            ),
            send_queue_peak: QueuePeak::default(),
            send_queue_peak_bytes: gauge(
                r,
                "refleet_reflector_send_queue_peak_bytes",
                "Largest number of bytes one connection had queued and not yet written since \
                 start, not counting a SYNC (bounded by --max-queued-bytes).",
            ),
            report_stream_connected: gauge(
                r,
                "refleet_reflector_report_stream_connected",
                "1 while the load-report stream to the operator is open, else 0.",
            ),
            files: FilesMetrics::register(r),
            registry,
        }
    }

    /// Counts one received frame of `action` (an entry of [`ACTIONS`], else "unknown").
    pub fn received(&self, action: &str) {
        let index = ACTIONS
            .iter()
            .position(|a| *a == action)
            .unwrap_or(ACTIONS.len() - 1);
        if let Some(c) = self.messages_received.get(index) {
            c.inc();
        }
    }

    /// Counts a close initiated by the reflector.
    pub fn closed(&self, label: &'static str) {
        self.closes.with_label_values(&[label]).inc();
    }

    /// Counts a JOIN refused for `reason` (an entry of [`REFUSAL_REASONS`]).
    pub fn join_refusals(&self, reason: &'static str) {
        self.join_refusals.with_label_values(&[reason]).inc();
    }

    /// Counts a SNAP by result.
    pub fn snapshot(&self, accepted: bool) {
        self.snapshots
            .with_label_values(&[if accepted { "accepted" } else { "ignored" }])
            .inc();
    }

    /// Counts a persisted-data operation (`save`, `lookup_hit`, `lookup_miss`, `error`).
    pub fn persistence(&self, op: &'static str) {
        self.persistence.with_label_values(&[op]).inc();
    }

    /// Counts a SNAP or SAVE whose URL was not recorded, by `reason` (an entry of
    /// [`STORED_URL_REASONS`]).
    pub fn stored_url_refused(&self, action: &'static str, reason: &'static str) {
        self.stored_url_refusals
            .with_label_values(&[action, reason])
            .inc();
    }

    /// Counts a stored-session-state operation.
    pub fn session_state(&self, op: &'static str, ok: bool) {
        self.session_state
            .with_label_values(&[op, if ok { "ok" } else { "error" }])
            .inc();
    }

    /// Counts a session leaving memory.
    pub fn session_end(&self, drained: bool) {
        self.session_ends
            .with_label_values(&[if drained { "drained" } else { "empty" }])
            .inc();
    }

    /// Counts a checkpoint event (see `refleet_reflector_checkpoints_total`).
    pub fn checkpoint(&self, outcome: &'static str) {
        self.checkpoints.with_label_values(&[outcome]).inc();
    }

    /// Counts a finished hand-off.
    pub fn hand_off(&self, stored: bool) {
        self.hand_offs
            .with_label_values(&[if stored { "stored" } else { "failed" }])
            .inc();
    }

    /// Counts a session whose task failed (a bug: it panicked) and was removed.
    pub fn session_failed(&self) {
        self.session_ends.with_label_values(&["failed"]).inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let peak = self.send_queue_peak.get();
        self.send_queue_peak_bytes
            .set(i64::try_from(peak).unwrap_or(i64::MAX));
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_exist_before_any_event_and_counters_end_in_total() {
        let m = Metrics::new("eu");
        let text = m.render();
        assert!(text.contains(r#"refleet_reflector_closes_total{reason="rate_limited"} 0"#));
        assert!(
            text.contains(r#"refleet_reflector_files_requests_total{method="PUT",status="4xx"} 0"#)
        );
        assert!(text.contains(r#"refleet_build_info{component="reflector",region="eu","#));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            if kind == "counter" {
                assert!(name.ends_with("_total"), "{name}");
            }
        }
    }

    #[test]
    fn unknown_actions_share_one_label() {
        let m = Metrics::new("local");
        m.received("NOT_AN_ACTION");
        m.received("SEND");
        let text = m.render();
        assert!(text.contains(r#"refleet_reflector_messages_received_total{action="unknown"} 1"#));
        assert!(text.contains(r#"refleet_reflector_messages_received_total{action="SEND"} 1"#));
    }
}
