//! The messages a session keeps for joining clients, and the snapshot they follow.
//!
//! A SYNC carries the latest snapshot's URL plus every message reflected after it, so this
//! owns both: the reflected messages still needed (each as the RECV frame that was sent, so
//! retaining one costs no copy), their byte count against the retained-bytes cap, and the
//! snapshot pointer. An accepted snapshot trims the messages it already contains.

use std::collections::VecDeque;
use std::ops::Range;

use serde_json::value::RawValue;

use super::stored::SnapshotRef;
use crate::frame::Text;

/// "b comes after a" for wrapping 32-bit sequence numbers (as upstream defines it).
pub fn seq_after(a: u32, b: u32) -> bool {
    let d = b.wrapping_sub(a);
    d > 0 && d < 0x0800_0000
}

/// The sequence number of a stored `[time, seq, …]` message.
fn message_seq(raw: &str) -> Option<u32> {
    let elems: Vec<&RawValue> = serde_json::from_str(raw).ok()?;
    serde_json::from_str(elems.get(1)?.get()).ok()
}

/// What a reflected message is, for the retention limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A client's SEND or a TUTTI's first message: within the limits, or dropped.
    Client,
    /// A tally result: may pass the limits by a small headroom, so that the snapshot vote
    /// that empties a full buffer still completes.
    Tally,
    /// A `users` message: always, or joining clients would never finish joining.
    Users,
}

/// One reflected message: the RECV frame as sent, and where its `[time, seq, …]` array is.
#[derive(Debug, Clone)]
struct Reflected {
    frame: Text,
    args: Range<usize>,
    seq: u32,
}

impl Reflected {
    fn args_text(&self) -> &str {
        self.frame.as_str().get(self.args.clone()).unwrap_or("[]")
    }
}

/// A retained message's `[time, seq, …]` text, shared with the frame it came in (a clone
/// costs a reference count, so a checkpoint takes them without copying on the session's task).
#[derive(Debug, Clone)]
pub(crate) struct ArgsRef {
    frame: Text,
    args: Range<usize>,
}

impl ArgsRef {
    pub fn as_str(&self) -> &str {
        self.frame.as_str().get(self.args.clone()).unwrap_or("[]")
    }
}

/// Retained messages since the latest snapshot, and that snapshot.
#[derive(Debug, Default)]
pub(crate) struct Retained {
    messages: VecDeque<Reflected>,
    /// Bytes of `messages` (their `[time, seq, …]` text): what the retained-bytes cap limits.
    bytes: usize,
    snapshot: Option<SnapshotRef>,
}

impl Retained {
    /// Messages and snapshot of a stored session; each message is rebuilt into the RECV frame
    /// (`prefix` + message + `}`) a live one would have been kept as.
    pub fn restore<'a>(
        prefix: &str,
        messages: impl IntoIterator<Item = &'a RawValue>,
        snapshot: Option<SnapshotRef>,
    ) -> Self {
        let mut retained = Self {
            snapshot,
            ..Self::default()
        };
        for raw in messages {
            let mut frame = String::with_capacity(prefix.len() + raw.get().len() + 1);
            frame.push_str(prefix);
            let start = frame.len();
            frame.push_str(raw.get());
            let end = frame.len();
            frame.push('}');
            // A message without a readable seq is kept; seq 0 lets the next snapshot trim it.
            let seq = message_seq(raw.get()).unwrap_or(0);
            retained.push(Text::from(frame), start..end, seq);
        }
        retained
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn snapshot(&self) -> Option<&SnapshotRef> {
        self.snapshot.as_ref()
    }

    /// Whether one more message of `len` bytes may be kept under the given limits, as
    /// widened for its `kind`.
    #[inline]
    pub fn admits(&self, kind: Kind, len: usize, max_messages: usize, max_bytes: usize) -> bool {
        let (limit_messages, limit_bytes) = match kind {
            Kind::Client => (max_messages, max_bytes),
            Kind::Tally => (
                max_messages.saturating_add(max_messages / 64 + 1),
                max_bytes.saturating_add(max_bytes / 64),
            ),
            Kind::Users => (usize::MAX, usize::MAX),
        };
        self.messages.len() < limit_messages && self.bytes.saturating_add(len) <= limit_bytes
    }

    /// Keeps a reflected frame whose `[time, seq, …]` array is at `args`.
    #[inline]
    pub fn push(&mut self, frame: Text, args: Range<usize>, seq: u32) {
        self.bytes += args.len();
        self.messages.push_back(Reflected { frame, args, seq });
    }

    /// The retained `[time, seq, …]` arrays, oldest first.
    pub fn args(&self) -> impl Iterator<Item = &str> {
        self.messages.iter().map(Reflected::args_text)
    }

    /// Every retained message, shared (see [`ArgsRef`]).
    pub fn shared_args(&self) -> Vec<ArgsRef> {
        self.messages
            .iter()
            .map(|m| ArgsRef {
                frame: m.frame.clone(),
                args: m.args.clone(),
            })
            .collect()
    }

    /// Whether a snapshot taken at `time` is newer than the one held.
    pub fn is_newer(&self, time: f64) -> bool {
        self.snapshot.as_ref().is_none_or(|cur| time > cur.time)
    }

    /// Makes `snap` the snapshot and drops the messages up to and including its seq (they
    /// are in it). Returns how many were dropped.
    pub fn set_snapshot(&mut self, snap: SnapshotRef) -> usize {
        let keep_from = self
            .messages
            .iter()
            .position(|m| seq_after(snap.seq, m.seq))
            .unwrap_or(self.messages.len());
        let trimmed: usize = self.messages.drain(..keep_from).map(|m| m.args.len()).sum();
        self.bytes -= trimmed;
        self.snapshot = Some(snap);
        keep_from
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).expect("raw")
    }

    fn snap(time: f64, seq: u32) -> SnapshotRef {
        SnapshotRef {
            url: "u".into(),
            time,
            seq,
        }
    }

    /// Retained messages with the given seqs, each `[seq,seq]`.
    fn with_seqs(seqs: &[u32]) -> Retained {
        let msgs: Vec<Box<RawValue>> = seqs.iter().map(|s| raw(&format!("[{s},{s}]"))).collect();
        Retained::restore("P", msgs.iter().map(|m| &**m), None)
    }

    #[test]
    fn seq_after_is_wrap_aware() {
        assert!(seq_after(u32::MAX, 0));
        assert!(seq_after(5, 6));
        assert!(!seq_after(6, 6));
        assert!(!seq_after(6, 5));
    }

    #[test]
    fn restore_rebuilds_frames_and_counts_only_the_message_bytes() {
        let r = with_seqs(&[5, 6]);
        assert_eq!(r.args().collect::<Vec<_>>(), ["[5,5]", "[6,6]"]);
        assert_eq!(r.bytes(), 10);
        assert_eq!(r.messages[0].frame.as_str(), "P[5,5]}");
    }

    #[test]
    fn a_snapshot_trims_through_its_seq_across_the_wrap() {
        let mut r = with_seqs(&[u32::MAX - 1, u32::MAX, 0, 1]);
        assert_eq!(r.set_snapshot(snap(1.0, u32::MAX)), 2);
        let left: Vec<u32> = r.messages.iter().map(|m| m.seq).collect();
        assert_eq!(left, [0, 1]);
        assert_eq!(r.bytes(), r.args().map(str::len).sum::<usize>());
        // A snapshot past everything empties the buffer and its byte count.
        assert_eq!(r.set_snapshot(snap(2.0, 7)), 2);
        assert!(r.is_empty());
        assert_eq!(r.bytes(), 0);
        assert_eq!(r.snapshot().map(|s| s.seq), Some(7));
    }

    #[test]
    fn a_snapshot_before_every_message_keeps_them_all() {
        let mut r = with_seqs(&[10, 11]);
        assert_eq!(r.set_snapshot(snap(1.0, 9)), 0);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn only_newer_snapshots_count() {
        let mut r = Retained::default();
        assert!(r.is_newer(0.0));
        r.set_snapshot(snap(5.0, 1));
        assert!(!r.is_newer(5.0));
        assert!(!r.is_newer(4.0));
        assert!(r.is_newer(5.5));
    }

    #[test]
    fn limits_widen_by_kind() {
        let r = with_seqs(&[1, 2]); // 2 messages, 10 bytes
        assert!(!r.admits(Kind::Client, 1, 2, 1000), "message count");
        assert!(r.admits(Kind::Client, 90, 3, 100));
        assert!(!r.admits(Kind::Client, 91, 3, 100), "bytes");
        // Tallies get 1/64 more (and at least one message).
        assert!(r.admits(Kind::Tally, 1, 2, 1000));
        assert!(r.admits(Kind::Tally, 120, 3, 128));
        assert!(!r.admits(Kind::Tally, 121, 3, 128));
        assert!(r.admits(Kind::Users, usize::MAX, 0, 0));
    }

    #[test]
    fn pushed_messages_are_counted_by_their_array_only() {
        let mut r = Retained::default();
        r.push(Text::from("{\"a\":[1,2,3]}".to_string()), 5..12, 2);
        assert_eq!(r.bytes(), 7);
        assert_eq!(r.args().next(), Some("[1,2,3]"));
    }
}
