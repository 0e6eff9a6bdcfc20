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
    /// TUTTI keys already tallied, with their send times.
    pub completed_tallies: Vec<(String, f64)>,
    /// User records of the members at the time of storing; they may rejoin seamlessly.
    pub users: Vec<Box<RawValue>>,
    /// Wall-clock time of storing (ms since the Unix epoch).
    pub stored_at_ms: u64,
    /// The identity the session was admitted under; it keeps it wherever it resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<crate::admission::Binding>,
    /// Admitted views by the hex fingerprint of their user record, each with the hex
    /// fingerprint of the token it was admitted with: what a returning view must present
    /// again. Fixed-size entries, however large the user records.
    #[serde(default, skip_serializing_if = "std::collections::HashMap::is_empty")]
    pub view_keys: std::collections::HashMap<String, String>,
    /// Written by earlier versions: admitted views by their user record's JSON text. Read on
    /// restore, never written.
    #[serde(default, skip_serializing)]
    pub views: std::collections::HashMap<String, String>,
    /// Stored when the session ended, moved or drained (its clients were closed first, so
    /// none saw more than this). False for a checkpoint of a running session: a crash may
    /// have lost messages some clients saw, so the session resumes on a fresh timeline.
    #[serde(default = "stored_clean")]
    pub clean: bool,
    /// Every reflected message since the snapshot, each `[time, seq, payload, …]` exactly as
    /// sent. Last, so that [`StoredSession::to_json_with`] can append them as they are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Box<RawValue>>,
}

impl StoredSession {
    /// The record as JSON, its messages taken from `messages` (each a `[time, seq, …]` text
    /// the reflector itself produced) and appended without parsing them again: a checkpoint
    /// of a busy session writes megabytes each interval, and re-validating every message it
    /// sent was most of that cost. `self.messages` must be empty.
    pub fn to_json_with<'a>(
        &self,
        messages: impl ExactSizeIterator<Item = &'a str>,
    ) -> Result<Vec<u8>, serde_json::Error> {
        debug_assert!(self.messages.is_empty());
        let mut out = serde_json::to_vec(self)?;
        if messages.len() == 0 {
            return Ok(out);
        }
        // The serialized object ends with its closing brace; the messages go before it.
        out.pop();
        out.extend_from_slice(b",\"messages\":[");
        for (i, m) in messages.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(m.as_bytes());
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }
}

/// Records written before checkpoints existed were all stored at the session's end.
fn stored_clean() -> bool {
    true
}

/// The current stored-session format.
pub const STORED_SESSION_FORMAT: u32 = 1;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record() -> StoredSession {
        serde_json::from_value(serde_json::json!({
            "format": 1, "session_id": "s", "timeline": "t", "time": 5, "seq": 2,
            "tick_ms": 50, "delay_ms": 0, "scale": 1.0, "tove": null, "name": "app/room",
            "app_id": "app", "persistent_id": "p", "developer_id": null, "code_hash": null,
            "leave_delay_ms": 0, "snapshot": null, "persisted_url": null,
            "completed_tallies": [], "users": ["\"a\""], "stored_at_ms": 1, "clean": false
        }))
        .unwrap()
    }

    #[test]
    fn messages_appended_as_text_read_back_as_the_same_record() {
        let r = record();
        let messages = [r#"[1,1,"x",0]"#, r#"[2,2,{"k":"v \" ,]"},0]"#];
        let body = r.to_json_with(messages.iter().copied()).unwrap();
        let back: StoredSession = serde_json::from_slice(&body).unwrap();
        let got: Vec<&str> = back.messages.iter().map(|m| m.get()).collect();
        assert_eq!(got, messages);
        assert_eq!(
            (back.seq, back.timeline.as_str(), back.clean),
            (2, "t", false)
        );
        // None: the same as serde's own output.
        let empty = r.to_json_with(std::iter::empty()).unwrap();
        assert_eq!(empty, serde_json::to_vec(&r).unwrap());
        let back: StoredSession = serde_json::from_slice(&empty).unwrap();
        assert!(back.messages.is_empty());
    }
}
