//! Fuzz target `frame`: the reflector's client frame parser (`refleet_reflector::frame`).
//!
//! Inputs: arbitrary text; JSON objects built from the protocol's words (then sometimes
//! damaged byte by byte); and well-formed JOIN, SEND, TUTTI, SNAP, SAVE, TICKS and PING
//! frames rendered from generated values.
//!
//! Properties: no panic; a refused frame maps to 4100, 4102 or 4103 with a close reason of
//! at most 123 bytes; `NotJson` only for text that is not JSON; an accepted frame is JSON;
//! an unknown action's name is cut to 64 characters; a SEND's kept text is the message array
//! from its third element, verbatim; and a rendered frame parses back to exactly the values
//! it was rendered from (JOIN fields, SEND elements and tags, TUTTI, SNAP, SAVE, TICKS, PING).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use refleet_fuzz::{Arbitrary, Unstructured, exact_number, json_space, json_value, mutate, word};
use refleet_reflector::frame::{self, ClientMsg, FrameError, Join, Save, Snap, Tags, Ticks, Tutti};
use serde_json::Value;
use serde_json::value::RawValue;

type R<T> = arbitrary::Result<T>;

const WORDS: &[&str] = &[
    "action",
    "args",
    "tags",
    "JOIN",
    "SEND",
    "TUTTI",
    "SNAP",
    "SAVE",
    "TICKS",
    "PING",
    "PULSE",
    "LOG",
    "version",
    "apiKey",
    "name",
    "appId",
    "persistentId",
    "developerId",
    "codeHash",
    "sdk",
    "tove",
    "user",
    "ticks",
    "tick",
    "delay",
    "scale",
    "leaveDelay",
    "time",
    "seq",
    "url",
    "dissident",
    "debounce",
    "msgID",
    "",
    "true",
    "null",
    "app/lobby",
];

fn json_text(v: &Value) -> String {
    serde_json::to_string(v).unwrap()
}

/// `"key":value` members of an object, in order, with random spacing.
fn object(u: &mut Unstructured<'_>, members: &[(&str, String)]) -> R<String> {
    let mut out = String::from("{");
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(json_space(u)?);
        out.push_str(&frame::json_string(k));
        out.push(':');
        out.push_str(json_space(u)?);
        out.push_str(v);
        out.push_str(json_space(u)?);
    }
    out.push('}');
    Ok(out)
}

/// A JSON array of `elems` with random spacing, and the text from the third element to the
/// end of the last one (what the reflector keeps of a message), if there are three.
fn array(u: &mut Unstructured<'_>, elems: &[String]) -> R<(String, Option<String>)> {
    let mut out = String::from("[");
    let mut third = None;
    for (i, e) in elems.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(json_space(u)?);
        if i == 2 {
            third = Some(out.len());
        }
        out.push_str(e);
    }
    let end = out.len();
    out.push_str(json_space(u)?);
    out.push(']');
    let rest = third.map(|t| out[t..end].to_owned());
    Ok((out, rest))
}

fn frame_text(u: &mut Unstructured<'_>, action: &str, args: Option<&str>) -> R<String> {
    let mut members = vec![("action", frame::json_string(action))];
    if let Some(a) = args {
        members.push(("args", a.to_owned()));
    }
    if u.ratio(1u8, 4u8)? {
        members.insert(0, ("id", frame::json_string(&word(u, WORDS)?)));
    }
    object(u, &members)
}

fn opt_string(u: &mut Unstructured<'_>) -> R<Option<String>> {
    Ok(if u.arbitrary()? {
        Some(String::arbitrary(u)?)
    } else {
        None
    })
}

fn opt_number(u: &mut Unstructured<'_>) -> R<Option<f64>> {
    Ok(if u.arbitrary()? {
        Some(exact_number(u)?)
    } else {
        None
    })
}

fn num(v: f64) -> String {
    json_text(&Value::from(v))
}

/// A JOIN rendered from generated fields, and the `Join` it must parse to.
fn join(u: &mut Unstructured<'_>) -> R<(String, Join)> {
    let mut want = Join {
        name: opt_string(u)?,
        app_id: opt_string(u)?,
        persistent_id: opt_string(u)?,
        developer_id: opt_string(u)?,
        code_hash: opt_string(u)?,
        sdk: opt_string(u)?,
        ..Join::default()
    };
    let version = match u.int_in_range(0..=2u8)? {
        0 => "1".to_owned(),
        1 => "\"1.2.3\"".to_owned(),
        _ => "true".to_owned(),
    };
    let mut members: Vec<(&str, String)> = vec![
        ("version", version),
        ("apiKey", frame::json_string(&word(u, WORDS)?)),
    ];
    for (key, value) in [
        ("name", &want.name),
        ("appId", &want.app_id),
        ("persistentId", &want.persistent_id),
        ("developerId", &want.developer_id),
        ("codeHash", &want.code_hash),
        ("sdk", &want.sdk),
    ] {
        match value {
            Some(s) => members.push((key, frame::json_string(s))),
            None if u.arbitrary()? => members.push((key, "null".into())),
            None => {}
        }
    }
    if let Some(t) = opt_string(u)? {
        let text = frame::json_string(&t);
        members.push(("tove", text.clone()));
        want.tove = Some(text);
    }
    if u.arbitrary()? {
        // A user is a string, a `[viewId]` array or an `{id, data}` object (or null: none);
        // a number or a boolean is refused, which `check_any` holds damaged frames to.
        let user = json_value(u, 3, WORDS)?;
        let user = match user {
            serde_json::Value::Bool(_) | serde_json::Value::Number(_) => {
                serde_json::Value::String(json_text(&user))
            }
            other => other,
        };
        if !user.is_null() {
            want.user = Some(json_text(&user));
        }
        members.push(("user", json_text(&user)));
    }
    if u.arbitrary()? {
        want.tick_ms = opt_number(u)?;
        want.delay_ms = opt_number(u)?;
        want.scale = opt_number(u)?;
        let mut ticks = Vec::new();
        for (k, v) in [
            ("tick", want.tick_ms),
            ("delay", want.delay_ms),
            ("scale", want.scale),
        ] {
            if let Some(v) = v {
                ticks.push((k, num(v)));
            }
        }
        members.push(("ticks", object(u, &ticks)?));
    }
    want.leave_delay_ms = opt_number(u)?;
    if let Some(l) = want.leave_delay_ms {
        members.push(("leaveDelay", num(l)));
    }
    // Member order does not matter to the parser.
    for i in (1..members.len()).rev() {
        let j = u.int_in_range(0..=i)?;
        members.swap(i, j);
    }
    let args = object(u, &members)?;
    Ok((frame_text(u, "JOIN", Some(&args))?, want))
}

fn elements(u: &mut Unstructured<'_>, n: usize) -> R<Vec<String>> {
    (0..n)
        .map(|_| Ok(json_text(&json_value(u, 2, WORDS)?)))
        .collect()
}

/// A SEND (with or without tags) and what it must parse to.
fn send(u: &mut Unstructured<'_>) -> R<(String, ClientMsg)> {
    let n = u.int_in_range(3..=7usize)?;
    let elems = elements(u, n)?;
    let (args, rest) = array(u, &elems)?;
    let tags = if u.arbitrary()? {
        let t = Tags {
            debounce: opt_number(u)?,
            msg_id: opt_string(u)?,
        };
        let mut members = Vec::new();
        if let Some(d) = t.debounce {
            members.push(("debounce", num(d)));
        }
        if let Some(m) = &t.msg_id {
            members.push(("msgID", frame::json_string(m)));
        }
        Some((object(u, &members)?, t))
    } else {
        None
    };
    let mut members = vec![("action", "\"SEND\"".to_owned()), ("args", args)];
    if let Some((text, _)) = &tags {
        members.push(("tags", text.clone()));
    }
    let want = ClientMsg::Send {
        rest: rest.expect("three elements").into(),
        tags: tags.map(|(_, t)| t),
    };
    Ok((object(u, &members)?, want))
}

fn tutti(u: &mut Unstructured<'_>) -> R<(String, ClientMsg)> {
    let send_time = exact_number(u)?;
    let seq = json_text(&json_value(u, 0, WORDS)?);
    let payload = String::arbitrary(u)?;
    let mut elems = vec![num(send_time), seq.clone(), frame::json_string(&payload)];
    let first_msg = if u.arbitrary()? {
        let n = u.int_in_range(3..=5usize)?;
        let inner = elements(u, n)?;
        let (text, rest) = array(u, &inner)?;
        elems.push(text);
        rest
    } else {
        elems.push("null".into());
        None
    };
    let wants_vote: bool = u.arbitrary()?;
    elems.push(wants_vote.to_string());
    let tally_target = json_text(&json_value(u, 2, WORDS)?);
    elems.push(tally_target.clone());
    let key = if u.arbitrary()? {
        let k = String::arbitrary(u)?;
        elems.push(frame::json_string(&k));
        k
    } else {
        if u.arbitrary()? {
            elems.push("null".into());
        }
        format!("{seq}:{send_time}")
    };
    let (args, _) = array(u, &elems)?;
    let want = ClientMsg::Tutti(Box::new(Tutti {
        send_time,
        payload,
        first_msg,
        wants_vote,
        tally_target,
        key,
    }));
    Ok((frame_text(u, "TUTTI", Some(&args))?, want))
}

fn dissident(u: &mut Unstructured<'_>, members: &mut Vec<(&str, String)>) -> R<bool> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => false,
        1 => {
            members.push(("dissident", "false".into()));
            false
        }
        2 => {
            members.push(("dissident", "null".into()));
            false
        }
        _ => {
            let v = json_value(u, 1, WORDS)?;
            let yes = !v.is_null() && v != Value::Bool(false);
            members.push(("dissident", json_text(&v)));
            yes
        }
    })
}

/// SNAP, SAVE, TICKS or PING, and what it must parse to.
fn small(u: &mut Unstructured<'_>) -> R<(String, ClientMsg)> {
    let mut members: Vec<(&str, String)> = Vec::new();
    let (action, want) = match u.int_in_range(0..=3u8)? {
        0 => {
            let time = exact_number(u)?;
            let seq = u32::arbitrary(u)?;
            let url = String::arbitrary(u)?;
            members.push(("time", num(time)));
            members.push(("seq", seq.to_string()));
            members.push(("url", frame::json_string(&url)));
            let dissident = dissident(u, &mut members)?;
            (
                "SNAP",
                ClientMsg::Snap(Snap {
                    time,
                    seq,
                    url,
                    dissident,
                }),
            )
        }
        1 => {
            let url = String::arbitrary(u)?;
            members.push(("url", frame::json_string(&url)));
            let dissident = dissident(u, &mut members)?;
            ("SAVE", ClientMsg::Save(Save { url, dissident }))
        }
        2 => {
            let t = Ticks {
                tick_ms: opt_number(u)?,
                delay_ms: opt_number(u)?,
                scale: opt_number(u)?,
            };
            for (k, v) in [
                ("tick", t.tick_ms),
                ("delay", t.delay_ms),
                ("scale", t.scale),
            ] {
                if let Some(v) = v {
                    members.push((k, num(v)));
                }
            }
            ("TICKS", ClientMsg::Ticks(t))
        }
        _ => {
            let arg = json_text(&json_value(u, 2, WORDS)?);
            let text = frame_text(u, "PING", Some(&arg))?;
            return Ok((text, ClientMsg::Ping(arg.into())));
        }
    };
    let args = object(u, &members)?;
    Ok((frame_text(u, action, Some(&args))?, want))
}

/// Whether `text` is JSON by the grammar: numbers of any size count (`1e999` is JSON, and a
/// SEND's payload is forwarded, not decoded), which a parse into `Value` would refuse.
fn is_json(text: &str) -> serde_json::Result<&RawValue> {
    serde_json::from_str::<&RawValue>(text)
}

/// The properties every input must hold, accepted or not.
fn check_any(text: &str, parsed: &Result<ClientMsg, FrameError>) {
    match parsed {
        Err(e) => {
            let close = e.close();
            assert!(
                [4100, 4102, 4103].contains(&close.code),
                "{text:?}: {e:?} closes with {}",
                close.code
            );
            assert!(close.reason.len() <= 123, "{text:?}: close reason too long");
            if matches!(e, FrameError::NotJson(_)) {
                assert!(
                    // (JSON whose numbers do not fit an f64, such as `1e999`, also counts
                    // as not JSON here: both close with 4102.)
                    serde_json::from_str::<Value>(text).is_err(),
                    "{text:?} is JSON but was refused as not JSON"
                );
            }
        }
        Ok(msg) => {
            assert!(
                is_json(text).is_ok(),
                "{text:?} is not JSON but was accepted as {msg:?}"
            );
            match msg {
                ClientMsg::Unknown(a) => assert!(a.chars().count() <= 64),
                ClientMsg::Send { rest, .. } => {
                    assert!(text.contains(&**rest));
                    // The kept text is still a run of JSON values.
                    let wrapped = format!("[{rest}]");
                    let elems: Vec<&RawValue> = serde_json::from_str(&wrapped)
                        .unwrap_or_else(|e| panic!("{text:?}: SEND kept {rest:?}: {e}"));
                    assert!(!elems.is_empty());
                }
                _ => {}
            }
        }
    }
}

fn one(u: &mut Unstructured<'_>) -> R<()> {
    match u.int_in_range(0..=9u8)? {
        // Arbitrary text.
        0 => {
            let text = <&str>::arbitrary(u)?;
            check_any(text, &frame::parse(text));
        }
        // Objects built from the protocol's words, sometimes damaged.
        1..=3 => {
            let action = word(u, WORDS)?;
            let args = json_value(u, 3, WORDS)?;
            let mut text = frame_text(u, &action, Some(&json_text(&args)))?;
            if u.arbitrary()? {
                text = mutate(u, &text)?;
            }
            check_any(&text, &frame::parse(&text));
        }
        // Well-formed frames: each parses back to what it was rendered from; a damaged one
        // is only held to the general properties.
        n => {
            let (text, want) = match n {
                4 | 5 => {
                    let (t, j) = join(u)?;
                    (t, ClientMsg::Join(Box::new(j)))
                }
                6 | 7 => send(u)?,
                8 => tutti(u)?,
                _ => small(u)?,
            };
            let got = frame::parse(&text);
            check_any(&text, &got);
            assert_eq!(got.as_ref(), Ok(&want), "{text}");
            let damaged = mutate(u, &text)?;
            check_any(&damaged, &frame::parse(&damaged));
        }
    }
    // The `_size` helper on a JSON object's text keeps it an object and counts UTF-16 units.
    if u.ratio(1u8, 8u8)? {
        let v = json_value(u, 2, WORDS)?;
        if let Value::Object(o) = &v
            && !o.contains_key("_size")
        {
            let text = json_text(&v);
            let sized: Value = serde_json::from_str(&frame::with_size(&text))
                .unwrap_or_else(|e| panic!("with_size({text:?}): {e}"));
            assert_eq!(sized["_size"], Value::from(frame::js_length(&text)));
            assert_eq!(frame::js_length(&text), text.encode_utf16().count());
        }
    }
    Ok(())
}

#[test]
fn fuzz_frame() {
    refleet_fuzz::run("frame", 20_000, one);
}
