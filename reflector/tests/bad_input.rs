//! Bad input gets its documented close code or HTTP status and never disturbs the other
//! clients of the session: after each case a bystander still receives RECVs in order and TICKs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures_util::SinkExt;
use serde_json::json;
use support::{Client, Event, TestReflector, start_with, temp_storage};
use tokio_tungstenite::tungstenite::Message;

/// A joined bystander with fast ticks; `check` proves it still receives messages in order and ticks.
async fn bystander(r: &TestReflector, session: &str) -> Client {
    let mut c = Client::connect(r, session).await;
    let mut args = Client::join_args("bystander");
    args["ticks"] = json!({"tick": 100, "delay": 0});
    c.join_with(args).await;
    c
}

async fn check(c: &mut Client, tag: &str) {
    let before = c.seq_probe(&format!("{tag}-1")).await;
    let after = c.seq_probe(&format!("{tag}-2")).await;
    assert_eq!(
        after,
        before.wrapping_add(1),
        "{tag}: consecutive sequence numbers"
    );
    c.next_action("TICK").await;
}

impl Client {
    async fn seq_probe(&mut self, payload: &str) -> u32 {
        self.send_msg(payload).await;
        loop {
            let m = self.next_client_recv().await;
            if m[2] == payload {
                return m[1].as_u64().unwrap() as u32;
            }
        }
    }
}

async fn joined_attacker(r: &TestReflector, session: &str) -> Client {
    let mut c = Client::connect(r, session).await;
    c.join("attacker").await;
    c
}

#[tokio::test]
async fn malformed_frames_close_with_4102() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut by = bystander(&r, "bad").await;
    for (i, frame) in [
        "{not json",
        "[1,2,3]",
        "\"a string\"",
        "{\"args\":[]}",
        r#"{"action":"SEND","args":"nope"}"#,
        r#"{"action":"SEND","args":[1,0]}"#,
        r#"{"action":"TUTTI","args":[1,0,{"not":"a string"}]}"#,
        r#"{"action":"SNAP","args":{"time":"x","seq":1,"url":"u"}}"#,
    ]
    .iter()
    .enumerate()
    {
        let mut a = joined_attacker(&r, "bad").await;
        a.send_text(frame).await;
        assert_eq!(a.expect_close().await, 4102, "{frame}");
        check(&mut by, &format!("malformed{i}")).await;
    }
    r.drain_and_stop().await;
}

#[tokio::test]
async fn bad_joins_get_the_upstream_codes() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut by = bystander(&r, "join").await;
    let cases = [
        (json!({"apiKey": "none", "user": "x"}), 4100, "no version"),
        (json!(7), 4100, "numeric args"),
        (json!({"version": 1, "user": "x"}), 4103, "no apiKey"),
        (
            json!({"version": 1, "apiKey": "k", "appId": 42}),
            4102,
            "appId not a string",
        ),
        (
            json!({"version": 1, "apiKey": "k", "ticks": [50]}),
            4102,
            "ticks not an object",
        ),
        (
            json!({"version": 1, "apiKey": "k", "leaveDelay": "long"}),
            4102,
            "leaveDelay not a number",
        ),
    ];
    for (args, code, what) in cases {
        let mut a = Client::connect(&r, "join").await;
        a.send_json(json!({"id": "join", "action": "JOIN", "args": args}))
            .await;
        assert_eq!(a.expect_close().await, code, "{what}");
        check(&mut by, what).await;
    }
    // No session id in the URL: 4100.
    let mut a = Client::connect_path(&r, "/reflector/", "").await;
    a.send_json(json!({"action": "JOIN", "args": Client::join_args("x")}))
        .await;
    assert_eq!(a.expect_close().await, 4100);
    r.drain_and_stop().await;
}

#[tokio::test]
async fn session_messages_before_join_close_with_4000() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut by = bystander(&r, "early").await;
    for action in ["SEND", "TUTTI", "SNAP", "SAVE", "TICKS"] {
        let mut a = Client::connect(&r, "early").await;
        let args = match action {
            "SEND" => json!([0, 0, "x", 0]),
            "TUTTI" => json!([1, 0, "v", null, true, [], "k@1"]),
            "SNAP" => json!({"time": 1, "seq": 1, "url": "u"}),
            "SAVE" => json!({"url": "u"}),
            _ => json!({"tick": 5}),
        };
        a.send_json(json!({"id": "early", "action": action, "args": args}))
            .await;
        assert_eq!(a.expect_close().await, 4000, "{action} before JOIN");
        check(&mut by, action).await;
    }
    r.drain_and_stop().await;
}

#[tokio::test]
async fn oversized_and_binary_frames_are_refused() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--max-frame-bytes", "2048"]).await;
    let mut by = bystander(&r, "size").await;
    let mut a = joined_attacker(&r, "size").await;
    a.send_msg(&"x".repeat(3000)).await;
    assert_eq!(a.expect_close().await, 1009);
    check(&mut by, "oversized").await;
    let mut a = joined_attacker(&r, "size").await;
    a.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(a.expect_close().await, 4102);
    check(&mut by, "binary").await;
    // Far over the limit: cut off by the WebSocket layer, still without harm to others.
    let mut a = joined_attacker(&r, "size").await;
    let _ = a.ws.send(Message::text("y".repeat(200_000))).await;
    match a.next().await {
        Event::Closed(code, _) => assert!(
            code == 1009 || code == 1006 || code == 1005,
            "closed with {code}"
        ),
        Event::Frame(f) => panic!("unexpected frame {f}"),
    }
    check(&mut by, "huge").await;
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_client_over_the_rate_limit_is_closed_with_4104() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--rate-limit", "20", "--rate-burst", "20"]).await;
    let mut by = bystander(&r, "rate").await;
    let mut a = joined_attacker(&r, "rate").await;
    for i in 0..60 {
        a.send_msg(&format!("flood{i}")).await;
    }
    assert_eq!(a.expect_close().await, 4104);
    check(&mut by, "rate").await;
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_save_without_app_identity_closes_with_4101() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "noapp").await;
    a.join_with(json!({"version": 1, "apiKey": "none", "user": "a"}))
        .await;
    a.send_json(json!({"id": "noapp", "action": "SAVE", "args": {"url": "http://x/y"}}))
        .await;
    assert_eq!(a.expect_close().await, 4101);
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_with_4121() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--join-timeout", "300ms"]).await;
    let mut a = Client::connect(&r, "silent").await;
    assert_eq!(a.expect_close().await, 4121);
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_text_frame_with_invalid_utf8_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut by = bystander(&r, "utf8").await;
    let mut a = joined_attacker(&r, "utf8").await;
    // A text frame whose payload is not UTF-8 (a lone continuation byte, then 0xFF).
    let payload: &[u8] = b"{\"action\":\"SEND\",\"args\":[0,0,\"\x80\xff\"]}";
    a.ws.send(Message::Frame(Frame::message(
        payload.to_vec(),
        OpCode::Data(Data::Text),
        true,
    )))
    .await
    .unwrap();
    match a.next().await {
        Event::Closed(code, reason) => {
            assert_eq!(code, 1007, "invalid frame payload data ({reason})");
            assert!(!reason.is_empty(), "the close says why");
        }
        Event::Frame(f) => panic!("unexpected frame {f}"),
    }
    check(&mut by, "utf8").await;
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_join_user_is_a_string_an_array_or_an_object() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut by = bystander(&r, "user").await;
    // What the client sends (protocol §4.1): the viewId, `[viewId]` with `location`, or
    // `{id, data}` with `viewData`.
    for (i, user) in [json!("u1"), json!(["u2"]), json!({"id": "u3", "data": "x"})]
        .into_iter()
        .enumerate()
    {
        let mut c = Client::connect(&r, "user").await;
        let mut args = Client::join_args("x");
        args["user"] = user;
        c.join_with(args).await;
        check(&mut by, &format!("user-ok{i}")).await;
    }
    for (i, user) in [json!(42), json!(true), json!(1.5)].into_iter().enumerate() {
        let mut a = Client::connect(&r, "user").await;
        let mut args = Client::join_args("x");
        args["user"] = user.clone();
        a.send_json(json!({"id": "user", "action": "JOIN", "args": args}))
            .await;
        match a.next().await {
            Event::Closed(code, reason) => {
                assert_eq!(code, 4102, "user {user}: {reason}");
                assert!(
                    reason.contains("user"),
                    "the reason names the field: {reason}"
                );
            }
            Event::Frame(f) => panic!("user {user} accepted: {f}"),
        }
        check(&mut by, &format!("user-bad{i}")).await;
    }
    r.drain_and_stop().await;
}
