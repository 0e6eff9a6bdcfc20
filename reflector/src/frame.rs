//! Client frames in, server frames out.
//!
//! Parsing happens on the connection's task (spread over all cores), so the session task only
//! stamps and fans out. A SEND's payload and trailing elements are never decoded: the text
//! from the third array element to the last one is kept verbatim and spliced into the RECV
//! after the new time and sequence number, exactly as the client sent it.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::close::{self, Close};

/// Text of a WebSocket frame: cheap to clone, so one serialised RECV is shared by every recipient.
pub type Text = axum::extract::ws::Utf8Bytes;

/// Why a client frame was refused; each maps to one close code.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// The text is not JSON.
    #[error("frame is not JSON: {0}")]
    NotJson(String),
    /// Valid JSON, but not an object with a string `action`.
    #[error("frame is not a JSON object with an action: {0}")]
    NotAnAction(String),
    /// A known action with arguments of the wrong shape.
    #[error("{action} arguments: {detail}")]
    BadArgs {
        /// The action whose arguments were wrong.
        action: &'static str,
        /// What was wrong, naming the field.
        detail: String,
    },
    /// A JOIN without a protocol version (or with numeric args, as very old clients send).
    #[error("JOIN without protocol version")]
    OutdatedProtocol,
    /// A JOIN without an `apiKey` property.
    #[error("JOIN without apiKey")]
    NoApiKey,
}

impl FrameError {
    /// The close this error leads to.
    pub fn close(&self) -> Close {
        match self {
            FrameError::OutdatedProtocol => close::OUTDATED_PROTOCOL,
            FrameError::NoApiKey => close::BAD_API_KEY,
            FrameError::NotJson(_) | FrameError::NotAnAction(_) => close::MALFORMED,
            FrameError::BadArgs { action, detail } => {
                close::MALFORMED.with_reason(format!("malformed {action}: {detail}"))
            }
        }
    }
}

fn bad(action: &'static str, detail: impl Into<String>) -> FrameError {
    FrameError::BadArgs {
        action,
        detail: detail.into(),
    }
}

/// The `tags` of a SEND (only `debounce` + `msgID` have a meaning).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Tags {
    /// Wall-clock milliseconds within which a second SEND with the same `msgID` is dropped.
    pub debounce: Option<f64>,
    /// The debounce key.
    #[serde(rename = "msgID")]
    pub msg_id: Option<String>,
}

/// Everything a JOIN carries that the reflector uses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Join {
    pub name: Option<String>,
    pub app_id: Option<String>,
    pub persistent_id: Option<String>,
    pub developer_id: Option<String>,
    pub code_hash: Option<String>,
    pub sdk: Option<String>,
    /// The first JOIN's `tove` is echoed in every SYNC; kept as its JSON text.
    pub tove: Option<String>,
    /// The user record as compact JSON text (a viewId string, an array or an object).
    pub user: Option<String>,
    pub tick_ms: Option<f64>,
    pub delay_ms: Option<f64>,
    pub scale: Option<f64>,
    pub leave_delay_ms: Option<f64>,
}

/// A TUTTI vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Tutti {
    pub send_time: f64,
    /// The vote; counted as a map key.
    pub payload: String,
    /// Elements 2.. of the `firstMsg` array as raw JSON text, when one was given.
    pub first_msg: Option<String>,
    pub wants_vote: bool,
    /// `tallyTarget` as raw JSON text (echoed).
    pub tally_target: String,
    pub key: String,
}

/// A SNAP announcement.
#[derive(Debug, Clone, PartialEq)]
pub struct Snap {
    pub time: f64,
    pub seq: u32,
    pub url: String,
    pub dissident: bool,
}

/// A SAVE of persisted data.
#[derive(Debug, Clone, PartialEq)]
pub struct Save {
    pub url: String,
    pub dissident: bool,
}

/// A tick request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ticks {
    pub tick_ms: Option<f64>,
    pub delay_ms: Option<f64>,
    pub scale: Option<f64>,
}

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    Join(Box<Join>),
    /// A SEND: `rest` is the raw text of the message array from its third element on.
    Send {
        rest: Box<str>,
        tags: Option<Tags>,
    },
    Tutti(Box<Tutti>),
    Snap(Snap),
    Save(Save),
    Ticks(Ticks),
    /// A PING with its raw argument text, echoed in the PONG.
    Ping(Box<str>),
    Pulse,
    Log,
    /// An action this reflector does not know (logged and ignored).
    Unknown(String),
}

impl ClientMsg {
    /// The action name for logs and metrics.
    pub fn action(&self) -> &str {
        match self {
            ClientMsg::Join(_) => "JOIN",
            ClientMsg::Send { .. } => "SEND",
            ClientMsg::Tutti(_) => "TUTTI",
            ClientMsg::Snap(_) => "SNAP",
            ClientMsg::Save(_) => "SAVE",
            ClientMsg::Ticks(_) => "TICKS",
            ClientMsg::Ping(_) => "PING",
            ClientMsg::Pulse => "PULSE",
            ClientMsg::Log => "LOG",
            ClientMsg::Unknown(a) => a,
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow)]
    args: Option<&'a RawValue>,
    #[serde(borrow)]
    tags: Option<&'a RawValue>,
}

/// Parses one text frame from a client.
pub fn parse(text: &str) -> Result<ClientMsg, FrameError> {
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            FrameError::NotAnAction(e.to_string())
        } else {
            FrameError::NotJson(e.to_string())
        }
    })?;
    let Some(action) = env.action else {
        return Err(FrameError::NotAnAction("no action".into()));
    };
    let args = env.args;
    Ok(match action.as_ref() {
        "SEND" => {
            let rest = message_rest(args, "SEND")?;
            let tags = match env.tags {
                None => None,
                Some(raw) => Some(
                    serde_json::from_str::<Tags>(raw.get())
                        .map_err(|e| bad("SEND", format!("tags: {e}")))?,
                ),
            };
            ClientMsg::Send {
                rest: rest.into(),
                tags,
            }
        }
        "JOIN" => ClientMsg::Join(Box::new(parse_join(args)?)),
        "TUTTI" => ClientMsg::Tutti(Box::new(parse_tutti(args)?)),
        "SNAP" => {
            let o = object(args, "SNAP")?;
            ClientMsg::Snap(Snap {
                time: number(&o, "time", "SNAP")?.ok_or_else(|| bad("SNAP", "time is required"))?,
                seq: seq(&o, "seq", "SNAP")?,
                url: string(&o, "url", "SNAP")?.ok_or_else(|| bad("SNAP", "url is required"))?,
                dissident: o
                    .get("dissident")
                    .is_some_and(|d| !d.is_null() && *d != Value::Bool(false)),
            })
        }
        "SAVE" => {
            let o = object(args, "SAVE")?;
            ClientMsg::Save(Save {
                url: string(&o, "url", "SAVE")?.ok_or_else(|| bad("SAVE", "url is required"))?,
                dissident: o
                    .get("dissident")
                    .is_some_and(|d| !d.is_null() && *d != Value::Bool(false)),
            })
        }
        "TICKS" => {
            let o = object(args, "TICKS")?;
            ClientMsg::Ticks(Ticks {
                tick_ms: number(&o, "tick", "TICKS")?,
                delay_ms: number(&o, "delay", "TICKS")?,
                scale: number(&o, "scale", "TICKS")?,
            })
        }
        "PING" => ClientMsg::Ping(args.map_or("null", |a| a.get()).into()),
        "PULSE" => ClientMsg::Pulse,
        "LOG" => ClientMsg::Log,
        other => ClientMsg::Unknown(other.chars().take(64).collect()),
    })
}

/// The raw text of a message array from its third element to its last.
fn message_rest<'a>(
    args: Option<&'a RawValue>,
    action: &'static str,
) -> Result<&'a str, FrameError> {
    let raw = args.ok_or_else(|| bad(action, "args must be a message array"))?;
    let elems: Vec<&RawValue> =
        serde_json::from_str(raw.get()).map_err(|_| bad(action, "args must be a message array"))?;
    array_rest(raw.get(), &elems)
        .ok_or_else(|| bad(action, "a message has at least time, seq and payload"))
}

/// Slices `whole` (a JSON array's text) from its third element to the end of its last one.
/// The elements borrow from `whole`, so their offsets locate them without copying.
fn array_rest<'a>(whole: &'a str, elems: &[&RawValue]) -> Option<&'a str> {
    let (third, last) = (elems.get(2)?, elems.last()?);
    let base = whole.as_ptr() as usize;
    let start = third.get().as_ptr() as usize - base;
    let end = last.get().as_ptr() as usize - base + last.get().len();
    whole.get(start..end)
}

fn object(args: Option<&RawValue>, action: &'static str) -> Result<Map<String, Value>, FrameError> {
    let raw = args.ok_or_else(|| bad(action, "args must be an object"))?;
    match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Object(o)) => Ok(o),
        _ => Err(bad(action, "args must be an object")),
    }
}

fn string(
    o: &Map<String, Value>,
    key: &str,
    action: &'static str,
) -> Result<Option<String>, FrameError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(action, format!("{key} must be a string"))),
    }
}

fn number(
    o: &Map<String, Value>,
    key: &str,
    action: &'static str,
) -> Result<Option<f64>, FrameError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(bad(action, format!("{key} must be a number"))),
    }
}

fn seq(o: &Map<String, Value>, key: &str, action: &'static str) -> Result<u32, FrameError> {
    match o.get(key) {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad(action, format!("{key} must be a uint32"))),
        _ => Err(bad(action, format!("{key} must be a uint32"))),
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

fn parse_join(args: Option<&RawValue>) -> Result<Join, FrameError> {
    let raw = args.ok_or(FrameError::OutdatedProtocol)?;
    let o = match serde_json::from_str::<Value>(raw.get()) {
        Ok(Value::Object(o)) => o,
        // Very old clients sent a number; the upstream answer is "outdated protocol".
        Ok(Value::Number(_)) | Ok(Value::Null) => return Err(FrameError::OutdatedProtocol),
        _ => return Err(bad("JOIN", "args must be an object")),
    };
    if !o.get("version").is_some_and(truthy) {
        return Err(FrameError::OutdatedProtocol);
    }
    if !o.contains_key("apiKey") {
        return Err(FrameError::NoApiKey);
    }
    let (tick_ms, delay_ms, scale) = match o.get("ticks") {
        None | Some(Value::Null) => (None, None, None),
        Some(Value::Object(t)) => (
            number(t, "tick", "JOIN")?,
            number(t, "delay", "JOIN")?,
            number(t, "scale", "JOIN")?,
        ),
        Some(_) => return Err(bad("JOIN", "ticks must be an object")),
    };
    let tove = match o.get("tove") {
        None | Some(Value::Null) => None,
        Some(v @ Value::String(_)) => Some(v.to_string()),
        Some(_) => return Err(bad("JOIN", "tove must be a string")),
    };
    // The client sends its viewId, `[viewId]` (with `location`) or `{id, data}` (with
    // `viewData`); the record is echoed to every member in `users`, so anything else is refused
    // like a wrongly typed `ticks` rather than passed on to the other clients.
    let user = match o.get("user") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::String(_) | Value::Array(_) | Value::Object(_))) => Some(v.to_string()),
        Some(_) => {
            return Err(bad("JOIN", "user must be a string, an array or an object"));
        }
    };
    Ok(Join {
        name: string(&o, "name", "JOIN")?,
        app_id: string(&o, "appId", "JOIN")?,
        persistent_id: string(&o, "persistentId", "JOIN")?,
        developer_id: string(&o, "developerId", "JOIN")?,
        code_hash: string(&o, "codeHash", "JOIN")?,
        sdk: string(&o, "sdk", "JOIN")?,
        tove,
        user,
        tick_ms,
        delay_ms,
        scale,
        leave_delay_ms: number(&o, "leaveDelay", "JOIN")?,
    })
}

fn parse_tutti(args: Option<&RawValue>) -> Result<Tutti, FrameError> {
    let raw = args.ok_or_else(|| bad("TUTTI", "args must be an array"))?;
    let elems: Vec<&RawValue> =
        serde_json::from_str(raw.get()).map_err(|_| bad("TUTTI", "args must be an array"))?;
    let get = |i: usize| elems.get(i).map(|r| r.get());
    let send_time = get(0)
        .and_then(|t| serde_json::from_str::<f64>(t).ok())
        .ok_or_else(|| bad("TUTTI", "sendTime must be a number"))?;
    let payload = get(2)
        .and_then(|p| serde_json::from_str::<String>(p).ok())
        .ok_or_else(|| bad("TUTTI", "payload must be a string"))?;
    let first_msg = match get(3) {
        None | Some("null") => None,
        Some(text) => {
            let inner: Vec<&RawValue> = serde_json::from_str(text)
                .map_err(|_| bad("TUTTI", "firstMsg must be a message array or null"))?;
            Some(
                array_rest(text, &inner)
                    .ok_or_else(|| bad("TUTTI", "firstMsg has at least time, seq and payload"))?
                    .to_string(),
            )
        }
    };
    let wants_vote = get(4).is_some_and(|w| w == "true");
    let tally_target = get(5).unwrap_or("null").to_string();
    let key = match get(6) {
        Some(k) if k != "null" => serde_json::from_str::<String>(k)
            .map_err(|_| bad("TUTTI", "tuttiKey must be a string"))?,
        // Clients before tutti keys identified a tally by its legacy seq and send time.
        _ => format!("{}:{}", get(1).unwrap_or("0"), send_time),
    };
    Ok(Tutti {
        send_time,
        payload,
        first_msg,
        wants_vote,
        tally_target,
        key,
    })
}

/// JSON text of a string (quotes and escapes included).
pub fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

/// Length of a string as JavaScript counts it (UTF-16 code units), for the `_size` field.
pub fn js_length(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Appends `"_size":N` to a meta payload object written without it, as upstream does.
pub fn with_size(payload_without_size: &str) -> String {
    let size = js_length(payload_without_size);
    let body = payload_without_size
        .strip_suffix('}')
        .unwrap_or(payload_without_size);
    let sep = if body.ends_with('{') { "" } else { "," };
    format!("{body}{sep}\"_size\":{size}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_keeps_payload_and_trailing_elements_verbatim() {
        let msg = parse(r#"{"id":"s","action":"SEND","args":[460, 0, "enc\"x", 0, {"a": 1}]}"#)
            .expect("parse");
        assert_eq!(
            msg,
            ClientMsg::Send {
                rest: r#""enc\"x", 0, {"a": 1}"#.into(),
                tags: None
            }
        );
    }

    #[test]
    fn send_tags_are_read() {
        let msg = parse(r#"{"action":"SEND","args":[1,0,"p",0],"tags":{"debounce":5000,"msgID":"pollForSnapshot"}}"#)
            .expect("parse");
        let ClientMsg::Send { tags: Some(t), .. } = msg else {
            panic!("not a tagged send")
        };
        assert_eq!(t.debounce, Some(5000.0));
        assert_eq!(t.msg_id.as_deref(), Some("pollForSnapshot"));
    }

    #[test]
    fn bad_frames_map_to_their_close_codes() {
        let code = |t: &str| parse(t).expect_err("must fail").close().code;
        assert_eq!(code("not json"), 4102);
        assert_eq!(code("[1,2,3]"), 4102);
        assert_eq!(code("42"), 4102);
        assert_eq!(code(r#"{"args":1}"#), 4102);
        assert_eq!(code(r#"{"action":"SEND","args":{"x":1}}"#), 4102);
        assert_eq!(code(r#"{"action":"SEND","args":[1,0]}"#), 4102);
        assert_eq!(code(r#"{"action":"JOIN","args":5}"#), 4100);
        assert_eq!(code(r#"{"action":"JOIN","args":{"apiKey":"none"}}"#), 4100);
        assert_eq!(code(r#"{"action":"JOIN","args":{"version":1}}"#), 4103);
        assert_eq!(
            code(r#"{"action":"JOIN","args":{"version":1,"apiKey":"k","appId":7}}"#),
            4102
        );
        assert_eq!(
            code(r#"{"action":"JOIN","args":{"version":1,"apiKey":"k","ticks":"fast"}}"#),
            4102
        );
        assert_eq!(
            code(r#"{"action":"SNAP","args":{"time":1,"seq":-1,"url":"u"}}"#),
            4102
        );
        assert_eq!(code(r#"{"action":"TUTTI","args":[1,0,5]}"#), 4102);
        for user in ["42", "true", "false", "1.5"] {
            let join =
                format!(r#"{{"action":"JOIN","args":{{"version":1,"apiKey":"k","user":{user}}}}}"#);
            assert_eq!(code(&join), 4102, "user {user}");
        }
    }

    #[test]
    fn join_fields_are_extracted() {
        let j = parse(
            r#"{"id":"x","action":"JOIN","args":{"name":"a/b","apiKey":"none","appId":"a","persistentId":"p",
            "developerId":"d","version":1,"user":["v1",{"x":1}],"ticks":{"tick":50,"delay":0},"tove":"T","leaveDelay":1250}}"#,
        )
        .expect("parse");
        let ClientMsg::Join(j) = j else {
            panic!("not a join")
        };
        assert_eq!(j.app_id.as_deref(), Some("a"));
        assert_eq!(j.user.as_deref(), Some(r#"["v1",{"x":1}]"#));
        assert_eq!(j.tick_ms, Some(50.0));
        assert_eq!(j.tove.as_deref(), Some(r#""T""#));
        assert_eq!(j.leave_delay_ms, Some(1250.0));
    }

    #[test]
    fn tutti_with_first_message_and_key() {
        let t = parse(r#"{"action":"TUTTI","args":[1470,0,"{\"h\":1}",[0,0,"enc",3],true,["handlePersistVote"],"persist@1470"]}"#)
            .expect("parse");
        let ClientMsg::Tutti(t) = t else {
            panic!("not a tutti")
        };
        assert_eq!(t.payload, r#"{"h":1}"#);
        assert_eq!(t.first_msg.as_deref(), Some(r#""enc",3"#));
        assert!(t.wants_vote);
        assert_eq!(t.tally_target, r#"["handlePersistVote"]"#);
        assert_eq!(t.key, "persist@1470");
    }

    #[test]
    fn unknown_actions_are_reported_not_rejected() {
        assert_eq!(
            parse(r#"{"action":"FROBNICATE","args":[]}"#).expect("parse"),
            ClientMsg::Unknown("FROBNICATE".into())
        );
        assert_eq!(
            parse(r#"{"action":"PING","args":123}"#).expect("parse"),
            ClientMsg::Ping("123".into())
        );
    }

    #[test]
    fn size_field_counts_the_payload_without_itself() {
        let s = with_size(r#"{"what":"users","active":1,"total":1,"joined":["6a0cvyrlr1"]}"#);
        assert_eq!(
            s,
            r#"{"what":"users","active":1,"total":1,"joined":["6a0cvyrlr1"],"_size":61}"#
        );
    }
}
