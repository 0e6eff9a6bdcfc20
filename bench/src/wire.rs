//! The reflector protocol as the bench speaks it: frames it sends, and a one-pass reader for
//! the frames it receives.
//!
//! Receiving is the hot path (every delivery of every client passes through it), so
//! [`parse`] finds the action, the RECV seq and the payload by scanning the text once,
//! without building a `serde_json::Value` or allocating. Only SYNC, which arrives once per
//! connection, goes through serde.
//!
//! A bench payload is an opaque string to the reflector: `B`, the sender's index (8 hex
//! digits), its message counter (16 hex digits) and the send time in nanoseconds since the
//! run's clock base (16 hex digits), padded with `.` to the requested size.

use std::fmt::Write as _;

/// Length of the meaningful part of a bench payload; shorter payloads are not possible.
pub const PAYLOAD_HEADER: usize = 1 + 8 + 16 + 16;

/// What a bench payload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Global index of the sending client.
    pub sender: u32,
    /// The sender's message counter, from 0.
    pub counter: u64,
    /// Send time, nanoseconds since the run's clock base.
    pub sent_ns: u64,
}

/// The payload of a RECV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// A message sent by a bench client.
    Bench(Stamp),
    /// A server-generated object (`users`, `tally`); the text starts at the `{`.
    Meta(&'a str),
    /// Any other string (not ours); raw JSON string contents.
    Foreign(&'a str),
}

/// One frame from the reflector, as much as the bench needs of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A reflected message.
    Recv {
        time: u64,
        seq: u32,
        payload: Payload<'a>,
    },
    /// A tick with its teatime.
    Tick { time: u64 },
    /// The SYNC (parse it with [`parse_sync`]).
    Sync,
    /// Any other action (INFO, REQU, PONG, ...).
    Other(&'a str),
}

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// No `"action"` property.
    NoAction,
    /// `args` missing or not shaped as the action requires.
    BadArgs,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::NoAction => f.write_str("frame has no action"),
            ParseError::BadArgs => f.write_str("frame args are malformed"),
        }
    }
}

impl std::error::Error for ParseError {}

/// Writes a bench payload of `size` bytes (at least [`PAYLOAD_HEADER`]) into `out`.
pub fn write_payload(out: &mut String, stamp: Stamp, size: usize) {
    let start = out.len();
    let _ = write!(
        out,
        "B{:08x}{:016x}{:016x}",
        stamp.sender, stamp.counter, stamp.sent_ns
    );
    let written = out.len() - start;
    for _ in written..size {
        out.push('.');
    }
}

/// Reads a bench payload (the contents of the JSON string).
pub fn read_payload(s: &str) -> Option<Stamp> {
    let b = s.as_bytes();
    if b.len() < PAYLOAD_HEADER || b[0] != b'B' {
        return None;
    }
    Some(Stamp {
        sender: u32::try_from(hex(&b[1..9])?).ok()?,
        counter: hex(&b[9..25])?,
        sent_ns: hex(&b[25..41])?,
    })
}

fn hex(b: &[u8]) -> Option<u64> {
    let mut v: u64 = 0;
    for &c in b {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

/// A SEND frame carrying a bench payload, exactly as the client shapes it.
pub fn send_frame(session_json: &str, stamp: Stamp, payload_size: usize) -> String {
    let mut s = String::with_capacity(48 + session_json.len() + payload_size);
    s.push_str("{\"id\":");
    s.push_str(session_json);
    s.push_str(",\"action\":\"SEND\",\"args\":[0,0,\"");
    write_payload(&mut s, stamp, payload_size);
    s.push_str("\",0]}");
    s
}

/// The JOIN the real client sends right after the socket opens.
pub fn join_frame(session_id: &str, view_id: &str, tick_ms: u32) -> String {
    serde_json::json!({
        "id": session_id,
        "action": "JOIN",
        "args": {
            "name": "bench/room",
            "apiKey": "none",
            "appId": "io.refleet.bench",
            "persistentId": "p",
            "developerId": "unknown_dev_id",
            "version": 1,
            "user": view_id,
            "ticks": {"tick": tick_ms, "delay": 0},
            "tove": "t",
            "leaveDelay": 0,
        }
    })
    .to_string()
}

/// The keep-alive the client sends when it has been quiet.
pub const PULSE: &str = "{\"action\":\"PULSE\"}";

/// A SNAP announcing a (pretend) snapshot at `time`/`seq`, so the reflector trims its
/// message buffer the way a real client's snapshot would.
pub fn snap_frame(session_json: &str, time: u64, seq: u32) -> String {
    format!(
        "{{\"id\":{session_json},\"action\":\"SNAP\",\"args\":{{\"time\":{time},\"seq\":{seq},\"hash\":\"bench\",\"url\":\"bench:snapshot/{time}\",\"dissident\":null}}}}"
    )
}

/// What the bench needs of a SYNC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sync {
    /// Seq of the last reflected message; the next RECV must carry `seq + 1`.
    pub seq: u32,
    /// Teatime at SYNC.
    pub time: u64,
}

/// Parses a SYNC frame (once per connection, so serde is fine here).
pub fn parse_sync(text: &str) -> Result<Sync, ParseError> {
    #[derive(serde::Deserialize)]
    struct Outer {
        args: Args,
    }
    #[derive(serde::Deserialize)]
    struct Args {
        seq: u32,
        time: f64,
    }
    let o: Outer = serde_json::from_str(text).map_err(|_| ParseError::BadArgs)?;
    Ok(Sync {
        seq: o.args.seq,
        time: o.args.time.max(0.0) as u64,
    })
}

/// Reads one server frame in a single pass.
pub fn parse(text: &str) -> Result<Frame<'_>, ParseError> {
    let action = find_string_value(text, "\"action\"").ok_or(ParseError::NoAction)?;
    match action {
        "RECV" => {
            let mut c = Cursor::after_key(text, "\"args\"").ok_or(ParseError::BadArgs)?;
            c.expect(b'[')?;
            let time = c.number()?;
            c.expect(b',')?;
            let seq = u32::try_from(c.number()?).map_err(|_| ParseError::BadArgs)?;
            c.expect(b',')?;
            c.skip_ws();
            let payload = match c.peek() {
                Some(b'"') => {
                    let s = c.string()?;
                    match read_payload(s) {
                        Some(stamp) => Payload::Bench(stamp),
                        None => Payload::Foreign(s),
                    }
                }
                Some(b'{') => Payload::Meta(&text[c.pos..]),
                _ => return Err(ParseError::BadArgs),
            };
            Ok(Frame::Recv { time, seq, payload })
        }
        "TICK" => {
            let mut c = Cursor::after_key(text, "\"args\"").ok_or(ParseError::BadArgs)?;
            c.skip_ws();
            if c.peek() == Some(b'{') {
                // `{"time": t}` is accepted by the client too.
                let mut c =
                    Cursor::after_key(&text[c.pos..], "\"time\"").ok_or(ParseError::BadArgs)?;
                return Ok(Frame::Tick { time: c.number()? });
            }
            Ok(Frame::Tick { time: c.number()? })
        }
        "SYNC" => Ok(Frame::Sync),
        other => Ok(Frame::Other(other)),
    }
}

/// The string value of `key` (which includes its quotes), if it has no escapes.
fn find_string_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut c = Cursor::after_key(text, key)?;
    c.string().ok()
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// Positioned after `key` and its colon.
    fn after_key(text: &'a str, key: &str) -> Option<Self> {
        let at = text.find(key)?;
        let mut c = Cursor {
            text,
            pos: at + key.len(),
        };
        c.expect(b':').ok()?;
        Some(c)
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), ParseError> {
        self.skip_ws();
        if self.peek() == Some(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(ParseError::BadArgs)
        }
    }

    /// A non-negative number; a fraction is skipped (teatime may be fractional).
    fn number(&mut self) -> Result<u64, ParseError> {
        self.skip_ws();
        let bytes = self.text.as_bytes();
        let start = self.pos;
        let mut v: u64 = 0;
        while let Some(&c @ b'0'..=b'9') = bytes.get(self.pos) {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                .ok_or(ParseError::BadArgs)?;
            self.pos += 1;
        }
        if self.pos == start {
            return Err(ParseError::BadArgs);
        }
        if bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            while let Some(b'0'..=b'9') = bytes.get(self.pos) {
                self.pos += 1;
            }
        }
        Ok(v)
    }

    /// A JSON string's raw contents (escapes left as they are).
    fn string(&mut self) -> Result<&'a str, ParseError> {
        self.expect(b'"')?;
        let bytes = self.text.as_bytes();
        let start = self.pos;
        while let Some(&c) = bytes.get(self.pos) {
            match c {
                b'"' => {
                    let s = &self.text[start..self.pos];
                    self.pos += 1;
                    return Ok(s);
                }
                b'\\' => self.pos += 2,
                _ => self.pos += 1,
            }
        }
        Err(ParseError::BadArgs)
    }
}

/// Upstream's "b is after a" for uint32 seqs that wrap.
pub fn seq_after(a: u32, b: u32) -> bool {
    let d = b.wrapping_sub(a);
    d > 0 && d < 0x8000_0000
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const STAMP: Stamp = Stamp {
        sender: 7,
        counter: 42,
        sent_ns: 123_456_789,
    };

    #[test]
    fn a_payload_round_trips_and_has_the_requested_size() {
        let mut s = String::new();
        write_payload(&mut s, STAMP, 64);
        assert_eq!(s.len(), 64);
        assert_eq!(read_payload(&s), Some(STAMP));
        let mut short = String::new();
        write_payload(&mut short, STAMP, 10);
        assert_eq!(short.len(), PAYLOAD_HEADER);
        assert_eq!(read_payload("hello"), None);
    }

    #[test]
    fn a_send_frame_is_the_json_the_client_sends() {
        let f = send_frame("\"s1\"", STAMP, 64);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["id"], "s1");
        assert_eq!(v["action"], "SEND");
        assert_eq!(v["args"][0], 0);
        assert_eq!(v["args"][2].as_str().unwrap().len(), 64);
        assert_eq!(v["args"][3], 0);
    }

    #[test]
    fn recv_frames_are_read_in_one_pass() {
        let mut p = String::new();
        write_payload(&mut p, STAMP, 64);
        let text =
            format!("{{\"id\":\"s\",\"action\":\"RECV\",\"args\":[1234,4294967281,\"{p}\",0]}}");
        assert_eq!(
            parse(&text).unwrap(),
            Frame::Recv {
                time: 1234,
                seq: 4294967281,
                payload: Payload::Bench(STAMP)
            }
        );
        let meta = r#"{"id":"s","action":"RECV","args":[209, 5, {"what":"users","joined":["v1"],"_size":9}]}"#;
        match parse(meta).unwrap() {
            Frame::Recv {
                time: 209,
                seq: 5,
                payload: Payload::Meta(m),
            } => assert!(m.starts_with("{\"what\":\"users\"")),
            other => panic!("{other:?}"),
        }
        let foreign = r#"{"id":"s","action":"RECV","args":[1.5,6,"a\"b",0]}"#;
        assert_eq!(
            parse(foreign).unwrap(),
            Frame::Recv {
                time: 1,
                seq: 6,
                payload: Payload::Foreign("a\\\"b")
            }
        );
    }

    #[test]
    fn ticks_syncs_and_others_are_told_apart() {
        assert_eq!(
            parse(r#"{"id":"s","action":"TICK","args":99}"#).unwrap(),
            Frame::Tick { time: 99 }
        );
        assert_eq!(
            parse(r#"{"id":"s","action":"TICK","args":{"time":7}}"#).unwrap(),
            Frame::Tick { time: 7 }
        );
        let sync = r#"{"id":"s","action":"SYNC","args":{"url":"","messages":[[1,2,"x",0]],"time":932,"seq":4294967281,"tove":"t"}}"#;
        assert_eq!(parse(sync).unwrap(), Frame::Sync);
        assert_eq!(
            parse_sync(sync).unwrap(),
            Sync {
                seq: 4294967281,
                time: 932
            }
        );
        assert_eq!(
            parse(r#"{"id":"s","action":"REQU"}"#).unwrap(),
            Frame::Other("REQU")
        );
        assert_eq!(parse("{}"), Err(ParseError::NoAction));
        assert_eq!(
            parse(r#"{"action":"RECV","args":[1,"x"]}"#),
            Err(ParseError::BadArgs)
        );
    }

    #[test]
    fn seq_after_wraps() {
        assert!(seq_after(u32::MAX, 0));
        assert!(seq_after(1, 2));
        assert!(!seq_after(2, 1));
        assert!(!seq_after(3, 3));
    }
}
