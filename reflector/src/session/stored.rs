//! The stored form of a session: everything needed to resume it on the same timeline, on
//! this reflector after a restart or on another one. `refleet_files::storage::Storage` keeps it
//! under `sessions/<sessionId>.json`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The snapshot a session last accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub url: String,
    pub time: f64,
    pub seq: u32,
}

/// Everything needed to resume a session on the same timeline: the format the drain writes
/// and the gateway's session move will hand over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredSession {
    /// Format version of this record.
    pub format: u32,
    pub session_id: String,
    pub timeline: String,
    /// Teatime when the session was stored (ms).
    pub time: u64,
    /// Sequence number of the last reflected message.
    pub seq: u32,
    pub tick_ms: u64,
    pub delay_ms: u64,
    pub scale: f64,
    /// The first JOIN's `tove`, as JSON text.
    pub tove: Option<String>,
    pub name: Option<String>,
    pub app_id: Option<String>,
    pub persistent_id: Option<String>,
    pub developer_id: Option<String>,
    pub code_hash: Option<String>,
    pub leave_delay_ms: u64,
    pub snapshot: Option<SnapshotRef>,
    pub persisted_url: Option<String>,
    /// Every reflected message since the snapshot, each `[time, seq, payload, …]` exactly as sent.
    pub messages: Vec<Box<RawValue>>,
    /// TUTTI keys already tallied, with their send times.
    pub completed_tallies: Vec<(String, f64)>,
    /// User records of the members at the time of storing; they may rejoin seamlessly.
    pub users: Vec<Box<RawValue>>,
    /// Wall-clock time of storing (ms since the Unix epoch).
    pub stored_at_ms: u64,
    /// The identity the session was admitted under; it keeps it wherever it resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<crate::admission::Binding>,
    /// Admitted views (user record JSON text) with a hex fingerprint of the token each was
    /// admitted with: what a returning view must present again.
    #[serde(default, skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub views: std::collections::HashMap<String, String>,
    /// Stored when the session ended, moved or drained (its clients were closed first, so
    /// none saw more than this). False for a checkpoint of a running session: a crash may
    /// have lost messages some clients saw, so the session resumes on a fresh timeline.
    #[serde(default = "stored_clean")]
    pub clean: bool,
}

/// Records written before checkpoints existed were all stored at the session's end.
fn stored_clean() -> bool {
    true
}

/// The current stored-session format.
pub const STORED_SESSION_FORMAT: u32 = 1;
