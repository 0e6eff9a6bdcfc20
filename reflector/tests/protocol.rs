//! Protocol behaviour over real WebSockets: ordering, sequence numbers, ticks, users,
//! tallies, snapshots, persistence, resume and drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Client, Event, start_with, temp_storage};

#[tokio::test]
async fn every_client_sees_one_total_order_and_each_senders_order() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "order").await;
    let mut b = Client::connect(&r, "order").await;
    a.join("a").await;
    b.join("b").await;
    const N: usize = 40;
    let (mut a, mut b) = tokio::join!(
        async move {
            for i in 0..N {
                a.send_msg(&format!("a:{i}")).await;
            }
            a
        },
        async move {
            for i in 0..N {
                b.send_msg(&format!("b:{i}")).await;
            }
            b
        }
    );
    let mut seen: Vec<Vec<(u64, String)>> = Vec::new();
    for c in [&mut a, &mut b] {
        let mut got = Vec::new();
        while got.len() < 2 * N {
            let m = c.next_client_recv().await;
            got.push((m[1].as_u64().unwrap(), m[2].as_str().unwrap().to_string()));
        }
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "both clients see the same order");
    for sender in ["a", "b"] {
        let ns: Vec<usize> = seen[0]
            .iter()
            .filter_map(|(_, p)| {
                p.strip_prefix(&format!("{sender}:"))
                    .map(|n| n.parse().unwrap())
            })
            .collect();
        assert_eq!(
            ns,
            (0..N).collect::<Vec<_>>(),
            "{sender}'s messages in the order sent"
        );
    }
    r.drain_and_stop().await;
}

#[tokio::test]
async fn sequence_numbers_start_near_the_top_and_wrap() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "wrap").await;
    let sync = a.join("a").await;
    assert_eq!(sync["seq"], 4_294_967_280u64);
    assert_eq!(sync["messages"], json!([]));
    assert_eq!(sync["url"], "");
    assert_eq!(sync["tove"], "TOVE");
    assert!(sync["timeline"].as_str().is_some_and(|t| !t.is_empty()));
    let users = a.next_recv().await;
    assert_eq!(
        users[1], 4_294_967_281u64,
        "the users message takes the first seq"
    );
    let mut seqs = Vec::new();
    let mut last_time = 0;
    for i in 0..20 {
        a.send_msg(&format!("m{i}")).await;
        let m = a.next_client_recv().await;
        let t = m[0].as_u64().unwrap();
        assert!(t >= last_time, "time never goes back");
        last_time = t;
        seqs.push(m[1].as_u64().unwrap());
    }
    assert_eq!(seqs[0], 4_294_967_282);
    assert_eq!(seqs[13], 4_294_967_295);
    assert_eq!(seqs[14], 0, "wraps to 0 after 0xFFFFFFFF");
    assert_eq!(seqs[19], 5);
    r.drain_and_stop().await;
}

#[tokio::test]
async fn ticks_fill_silence_at_the_requested_rate_and_messages_are_preserved_verbatim() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "ticks").await;
    let mut args = Client::join_args("a");
    args["ticks"] = json!({"tick": 50, "delay": 0});
    a.join_with(args).await;
    let start = Instant::now();
    let mut ticks = 0;
    let mut last = 0;
    while start.elapsed() < Duration::from_millis(1000) {
        if let Event::Frame(v) = a.next().await
            && v["action"] == "TICK"
        {
            assert!(v["id"] == "ticks", "TICK carries the session id");
            let t = v["args"].as_u64().unwrap();
            assert!(t >= last);
            last = t;
            ticks += 1;
        }
    }
    assert!(
        (12..=24).contains(&ticks),
        "about 20 ticks of 50 ms in a second, got {ticks}"
    );
    // Extra elements and odd spacing come back exactly as sent.
    a.send_text(r#"{"id":"ticks","action":"SEND","args":[1, 0, "x\u00e9", 7, {"k": [1, 2]}]}"#)
        .await;
    let frame = loop {
        match a.next().await {
            Event::Frame(v) if v["action"] == "RECV" && v["args"][2] == "xé" => break v,
            Event::Frame(_) => {}
            Event::Closed(c, r) => panic!("closed {c} {r}"),
        }
    };
    assert_eq!(frame["args"][3], 7);
    assert_eq!(frame["args"][4], json!({"k": [1, 2]}));
    r.drain_and_stop().await;
}

#[tokio::test]
async fn joins_and_leaves_are_announced_after_the_leave_delay() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "users").await;
    a.join("a").await;
    let u = a.next_users().await;
    assert_eq!(u["joined"], json!(["a"]));
    assert_eq!(u["active"], 1);
    assert_eq!(u["_size"].as_u64().unwrap() as usize, {
        let mut v = u.clone();
        v.as_object_mut().unwrap().remove("_size");
        v.to_string().len()
    });
    let mut b = Client::connect(&r, "users").await;
    let mut args = Client::join_args("b");
    args["leaveDelay"] = json!(600);
    let sync = b.join_with(args).await;
    assert_eq!(
        sync["messages"].as_array().unwrap().len(),
        1,
        "B's SYNC carries A's joined message"
    );
    assert_eq!(a.next_users().await["joined"], json!(["b"]));
    let closed_at = Instant::now();
    b.close().await;
    let left = a.next_users().await;
    assert_eq!(left["left"], json!(["b"]));
    assert_eq!(left["total"], 1);
    assert!(
        closed_at.elapsed() >= Duration::from_millis(600),
        "left only after the leave delay"
    );
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_dropped_client_rejoins_on_the_same_timeline_without_a_leave() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "rejoin").await;
    a.join("a").await;
    let mut b = Client::connect(&r, "rejoin").await;
    let mut args = Client::join_args("b");
    args["leaveDelay"] = json!(1500);
    let first = b.join_with(args.clone()).await;
    let mut joined = Vec::new();
    while joined.len() < 2 {
        joined.extend(
            a.next_users().await["joined"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        );
    }
    b.send_msg("before").await;
    a.next_client_recv().await;
    drop(b); // a network drop: no close handshake
    a.send_msg("while away").await;
    a.next_client_recv().await;
    let mut b2 = Client::connect(&r, "rejoin").await;
    let second = b2.join_with(args).await;
    assert_eq!(
        first["timeline"], second["timeline"],
        "same timeline: the client keeps its model"
    );
    let payloads: Vec<Value> = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[2].clone())
        .collect();
    assert!(
        payloads.contains(&json!("while away")),
        "missed messages are in the SYNC"
    );
    // No users message about b follows: neither a leave nor a second join.
    a.send_msg("after").await;
    loop {
        let m = a.next_recv().await;
        assert!(m[2]["what"] != "users", "unexpected users message {m}");
        if m[2] == "after" {
            break;
        }
    }
    r.drain_and_stop().await;
}

#[tokio::test]
async fn tallies_combine_votes_and_time_out_with_missing_clients() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "tutti").await;
    let mut b = Client::connect(&r, "tutti").await;
    a.join("a").await;
    b.join("b").await;
    let vote = |key: &str, payload: &str, first: Value| json!({"id": "tutti", "action": "TUTTI", "args": [100, 0, payload, first, true, ["handleSnapshotVote"], key]});
    a.send_json(vote(
        "snapshot@100",
        "{\"h\":1}",
        json!([0, 0, "first!", 0]),
    ))
    .await;
    b.send_json(vote(
        "snapshot@100",
        "{\"h\":1}",
        json!([0, 0, "first again", 0]),
    ))
    .await;
    let first = a.next_client_recv().await;
    assert_eq!(
        first[2], "first!",
        "firstMsg is reflected once, when the tally opens"
    );
    let tally = loop {
        let m = a.next_recv().await;
        if m[2]["what"] == "tally" {
            break m[2].clone();
        }
        assert!(m[2] != "first again");
    };
    assert_eq!(tally["tally"], json!({"{\"h\":1}": 2}));
    assert_eq!(tally["missingClients"], 0);
    assert_eq!(tally["tuttiKey"], "snapshot@100");
    assert_eq!(tally["tallyTarget"], json!(["handleSnapshotVote"]));
    // A vote for a completed key is ignored; a lone vote completes after the tally window.
    a.send_json(vote("snapshot@100", "{\"h\":9}", Value::Null))
        .await;
    let sent = Instant::now();
    a.send_json(vote("persist@200", "{\"h\":2}", Value::Null))
        .await;
    let late = loop {
        let m = a.next_recv().await;
        if m[2]["what"] == "tally" {
            break m[2].clone();
        }
    };
    assert_eq!(
        late["tuttiKey"], "persist@200",
        "the repeated key produced no second tally"
    );
    assert_eq!(late["missingClients"], 1);
    assert!(sent.elapsed() >= Duration::from_millis(900));
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_snapshot_trims_messages_and_late_joiners_start_from_it() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "snap").await;
    a.join("a").await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        a.send_msg(&format!("m{i}")).await;
        let m = a.next_client_recv().await;
        seqs.push((m[0].as_u64().unwrap(), m[1].as_u64().unwrap()));
    }
    let (snap_time, snap_seq) = seqs[2];
    let url = format!(
        "{}/apps/io.refleet.test/snap/code1/pid-1.snap/{snap_time:010}_{snap_seq}.h",
        r.files_base()
    );
    a.send_json(json!({"id": "snap", "action": "SNAP", "args": {"time": snap_time, "seq": snap_seq, "hash": "h", "url": url, "dissident": null}}))
        .await;
    // A snapshot that is not newer (its time is not after the accepted one's) and a dissident
    // one change nothing. (Not a fixed "time 1": a fast run reflects m2 at teatime 0, and a
    // snapshot at 1 is then rightly newer.)
    a.send_json(
        json!({"id": "snap", "action": "SNAP", "args": {"time": snap_time, "seq": 1, "url": "old"}}),
    )
    .await;
    a.send_json(json!({"id": "snap", "action": "SNAP", "args": {"time": snap_time + 5000, "seq": snap_seq, "url": "dissident", "dissident": {"hash": "x"}}})).await;
    a.send_msg("after").await;
    a.next_client_recv().await;
    let mut c = Client::connect(&r, "snap").await;
    let sync = c.join("c").await;
    assert_eq!(sync["url"], url.as_str());
    assert_eq!(sync["snapshotSeq"], snap_seq);
    assert_eq!(sync["snapshotTime"], snap_time);
    let kept: Vec<Value> = sync["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[2].clone())
        .collect();
    assert_eq!(kept, vec![json!("m3"), json!("m4"), json!("after")]);
    r.drain_and_stop().await;
}

#[tokio::test]
async fn debounced_sends_are_dropped_within_their_window() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "debounce").await;
    a.join("a").await;
    for p in ["poll1", "poll2"] {
        a.send_json(json!({"id": "debounce", "action": "SEND", "args": [0, 0, p, 0], "tags": {"debounce": 5000, "msgID": "pollForSnapshot"}}))
            .await;
    }
    a.send_msg("plain").await;
    assert_eq!(a.next_client_recv().await[2], "poll1");
    assert_eq!(
        a.next_client_recv().await[2],
        "plain",
        "the second poll inside the window was dropped"
    );
    r.drain_and_stop().await;
}

#[tokio::test]
async fn ping_gets_a_pong_without_id_and_unknown_actions_are_ignored() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "ping").await;
    a.join("a").await;
    a.send_text(r#"{"action":"FUTURE_THING","args":{"x":1}}"#)
        .await;
    a.send_text(r#"{"action":"PULSE"}"#).await;
    a.send_text(r#"{"action":"LOG","args":"hello"}"#).await;
    a.send_text(r#"{"action":"PING","args":12345}"#).await;
    let pong = a.next_action("PONG").await;
    assert_eq!(pong, json!({"action": "PONG", "args": 12345}));
    a.send_msg("still here").await;
    assert_eq!(a.next_client_recv().await[2], "still here");
    r.drain_and_stop().await;
}

#[tokio::test]
async fn persisted_data_carries_over_to_a_new_code_version() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--empty-session-ttl", "1s"]).await;
    let mut v1 = Client::connect(&r, "session-v1").await;
    let sync = v1.join("a").await;
    assert!(sync.get("persisted").is_none());
    let saved = format!("{}/apps/io.refleet.test/pid-1/save/hash1", r.files_base());
    v1.send_json(json!({"id": "session-v1", "action": "SAVE", "args": {"persistTime": 10, "url": saved, "dissident": null}}))
        .await;
    v1.send_msg("sync point").await;
    v1.next_client_recv().await;
    v1.close().await;
    // New code, new session id, same persistentId.
    let mut v2 = Client::connect(&r, "session-v2").await;
    let sync = v2.join("b").await;
    assert_eq!(sync["url"], saved.as_str());
    assert_eq!(sync["persisted"], true);
    assert_eq!(sync["messages"], json!([]));
    assert_eq!(sync["seq"], 4_294_967_280u64);
    r.drain_and_stop().await;
}

#[tokio::test]
async fn an_empty_session_is_stored_and_resumed_on_the_same_timeline() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--empty-session-ttl", "300ms"]).await;
    let mut a = Client::connect(&r, "resume").await;
    let first = a.join("a").await;
    for i in 0..3 {
        a.send_msg(&format!("m{i}")).await;
        a.next_client_recv().await;
    }
    a.close().await;
    // Wait past the TTL (leave delay 0 + 2 s floor).
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_eq!(
        r.registry().session_count(),
        0,
        "the empty session left memory"
    );
    let mut b = Client::connect(&r, "resume").await;
    let sync = b.join("b").await;
    assert_eq!(sync["timeline"], first["timeline"]);
    let payloads: Vec<Value> = sync["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[2].clone())
        .collect();
    assert!(
        payloads.ends_with(&[json!("m0"), json!("m1"), json!("m2")]),
        "{payloads:?}"
    );
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_drain_stores_everything_sent_and_a_restart_resumes_it() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--drain-timeout", "200ms"]).await;
    let addr = r.addr;
    let mut a = Client::connect(&r, "drain").await;
    let first = a.join("a").await;
    let mut b = Client::connect(&r, "drain").await;
    b.join("b").await;
    a.send_msg("before drain").await;
    let mut r = r;
    r.begin_drain();
    // Keep sending while the drain runs: everything handed to the socket before the close
    // must survive.
    let mut sent = 0;
    let code = loop {
        a.send_msg(&format!("late{sent}")).await;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f))))) =
            tokio::time::timeout(
                Duration::from_millis(1),
                futures_util::StreamExt::next(&mut a.ws),
            )
            .await
        {
            break u16::from(f.code);
        }
        if sent > 400 {
            panic!("no close during drain");
        }
    };
    assert_eq!(code, 4003, "clients are asked to reconnect");
    // Our side of the close handshake: the messages above were sent before it.
    let _ = a.ws.close(None).await;
    let _ = b.expect_close().await;
    drop(b);
    r.drain_and_stop().await;
    // A reflector on the same storage and port resumes the session.
    let r2 = support::start_on(&addr.to_string(), &dir, &[]).await;
    let mut c = Client::connect(&r2, "drain").await;
    let sync = c.join("a").await;
    assert_eq!(
        sync["timeline"], first["timeline"],
        "same timeline after the restart"
    );
    let payloads: Vec<String> = sync["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m[2].as_str().map(String::from))
        .collect();
    assert!(payloads.contains(&"before drain".to_string()));
    let late: Vec<&String> = payloads.iter().filter(|p| p.starts_with("late")).collect();
    assert_eq!(
        late.len(),
        sent,
        "every message sent before the client's close is kept: {payloads:?}"
    );
    // The resumed members rejoin silently; one that does not come back leaves after the grace.
    r2.drain_and_stop().await;
}

#[tokio::test]
async fn a_slow_client_is_cut_off_and_the_others_keep_going() {
    let (_d, dir) = temp_storage();
    let r = start_with(
        &dir,
        &[
            "--send-queue",
            "16",
            "--rate-limit",
            "100000",
            "--rate-burst",
            "100000",
        ],
    )
    .await;
    let mut fast = Client::connect(&r, "slow").await;
    fast.join("fast").await;
    let mut slow = Client::connect(&r, "slow").await;
    slow.join("slow").await;
    // The slow client never reads; big messages fill its socket buffers and then its queue.
    let big = "x".repeat(60_000);
    let mut received = 0;
    let mut slow_left = false;
    for i in 0..200 {
        fast.send_msg(&format!("{i}{big}")).await;
        loop {
            let m = fast.next_recv().await;
            if m[2]["what"] == "users" {
                slow_left |= m[2]["left"] == json!(["slow"]);
                continue;
            }
            assert!(
                m[2].as_str().unwrap().starts_with(&format!("{i}x")),
                "in order, nothing lost"
            );
            received += 1;
            break;
        }
    }
    assert_eq!(received, 200);
    let text = r.metrics().await;
    assert!(
        support::metric(&text, "refleet_reflector_slow_client_disconnects_total") >= 1.0,
        "slow client cut off"
    );
    while !slow_left {
        slow_left = fast.next_users().await["left"] == json!(["slow"]);
    }
    r.drain_and_stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let (_d, dir) = temp_storage();
    let mut r = start_with(&dir, &["--drain-timeout", "2s"]).await;
    assert_eq!(reqwest::get(r.url("/healthz")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(r.url("/readyz")).await.unwrap().status(), 200);
    let mut a = Client::connect(&r, "m").await;
    a.join("a").await;
    a.send_msg("x").await;
    a.next_client_recv().await;
    let text = r.metrics().await;
    assert_eq!(support::metric(&text, "refleet_reflector_sessions"), 1.0);
    assert_eq!(support::metric(&text, "refleet_reflector_connections"), 1.0);
    assert!(
        support::metric(
            &text,
            "refleet_reflector_messages_received_total{action=\"SEND\"}"
        ) >= 1.0
    );
    assert!(support::metric(&text, "refleet_reflector_deliveries_total") >= 2.0);
    r.begin_drain();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        reqwest::get(r.url("/readyz")).await.unwrap().status(),
        503,
        "not ready while draining"
    );
    assert_eq!(reqwest::get(r.url("/healthz")).await.unwrap().status(), 200);
    // A new session is refused while draining; the existing one still works.
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{}/reflector/new-one", r.addr)).await;
    assert!(refused.is_err(), "upgrade refused for a new session");
    a.send_msg("y").await;
    assert_eq!(a.next_client_recv().await[2], "y");
    a.close().await;
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_drain_stores_empty_sessions_at_once_instead_of_waiting_for_their_ttl() {
    let (_d, dir) = temp_storage();
    let r = start_with(
        &dir,
        &["--empty-session-ttl", "60s", "--drain-timeout", "30s"],
    )
    .await;
    let addr = r.addr;
    let mut a = Client::connect(&r, "idle-at-drain").await;
    let first = a.join("a").await;
    a.send_msg("kept").await;
    a.next_client_recv().await;
    a.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    r.drain_and_stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        started.elapsed()
    );
    let r2 = support::start_on(&addr.to_string(), &dir, &[]).await;
    let mut b = Client::connect(&r2, "idle-at-drain").await;
    let sync = b.join("b").await;
    assert_eq!(sync["timeline"], first["timeline"]);
    assert!(
        sync["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m[2] == "kept")
    );
    r2.drain_and_stop().await;
}

#[tokio::test]
async fn the_session_id_is_the_last_path_segment_of_any_upgrade_path() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect_path(&r, "/paths", "paths").await;
    let mut b = Client::connect_path(&r, "/reflector/paths?region=x", "paths").await;
    let mut c = Client::connect_path(&r, "/v1/some-token/paths", "paths").await;
    let t = a.join("a").await["timeline"].clone();
    assert_eq!(b.join("b").await["timeline"], t);
    assert_eq!(
        c.join("c").await["timeline"],
        t,
        "one session, whatever the prefix"
    );
    c.send_msg("hello").await;
    assert_eq!(a.next_client_recv().await[2], "hello");
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_full_message_buffer_asks_for_a_snapshot_and_then_drops_sends() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--requ-messages", "4", "--max-messages", "6"]).await;
    let mut a = Client::connect(&r, "full").await;
    a.join("a").await;
    for i in 0..8 {
        a.send_msg(&format!("m{i}")).await;
    }
    let (mut requ, mut info) = (0, false);
    let mut reflected = Vec::new();
    let mut last_seq = 0;
    while !(info && reflected.len() == 6) {
        match a.next().await {
            Event::Frame(v) if v["action"] == "REQU" => requ += 1,
            Event::Frame(v) if v["action"] == "INFO" => {
                assert_eq!(v["args"]["code"], "SNAPSHOT_NEEDED");
                info = true;
            }
            Event::Frame(v) if v["action"] == "RECV" && v["args"][2].is_string() => {
                reflected.push(v["args"][2].as_str().unwrap().to_string());
                last_seq = v["args"][1].as_u64().unwrap();
            }
            Event::Frame(_) => {}
            Event::Closed(c, r) => panic!("closed {c} {r}"),
        }
    }
    assert!(
        requ >= 2,
        "REQU at the threshold and with the refusal, got {requ}"
    );
    assert_eq!(
        reflected,
        vec!["m0", "m1", "m2", "m3", "m4", "m5"],
        "m6 and m7 did not fit the buffer"
    );
    // A snapshot empties the buffer; messages flow again.
    // (A SNAP URL counts only under the session's own snapshot folder.)
    let url = format!(
        "{}/apps/io.refleet.test/snap/code1/pid-1.full/0000000001_{last_seq}.h",
        r.files_base()
    );
    a.send_json(
        json!({"id": "full", "action": "SNAP", "args": {"time": 1, "seq": last_seq, "url": url}}),
    )
    .await;
    a.send_msg("after snapshot").await;
    assert_eq!(a.next_client_recv().await[2], "after snapshot");
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_sync_over_one_megabyte_arrives_in_chunks() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let mut a = Client::connect(&r, "chunks").await;
    a.join("a").await;
    let big = "z".repeat(300_000);
    for i in 0..5 {
        a.send_msg(&format!("{i}{big}")).await;
        a.next_client_recv().await;
    }
    let mut late = Client::connect(&r, "chunks").await;
    late.send_json(json!({"id": "chunks", "action": "JOIN", "args": Client::join_args("late")}))
        .await;
    let mut whole = String::new();
    let mut pieces = 0;
    loop {
        let raw = late.next_raw().await;
        let rest = raw.strip_prefix("_CHUNK").expect("a chunk frame");
        let (first, last) = (&rest[0..1], &rest[1..2]);
        assert_eq!(
            first == "1",
            pieces == 0,
            "only the first chunk is marked first"
        );
        whole.push_str(&rest[2..]);
        pieces += 1;
        assert!(raw.len() <= 1_000_008);
        if last == "1" {
            break;
        }
    }
    assert!(pieces >= 2, "split into {pieces} chunks");
    let sync: Value = serde_json::from_str(&whole).expect("the chunks join into one SYNC");
    assert_eq!(sync["action"], "SYNC");
    let big_ones = sync["args"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m[2].is_string())
        .count();
    assert_eq!(big_ones, 5);
    r.drain_and_stop().await;
}

#[tokio::test]
async fn sessions_lists_each_session_with_its_members() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--region", "eu-west"]).await;
    let mut a = Client::connect(&r, "listed").await;
    a.join("a").await;
    let mut b = Client::connect(&r, "listed").await;
    b.join("b").await;
    a.send_msg("x").await;
    a.next_client_recv().await;
    let text = reqwest::get(r.url("/sessions"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["region"], "eu-west");
    assert_eq!(body["draining"], false);
    let s = &body["sessions"][0];
    assert_eq!(s["sessionId"], "listed");
    assert_eq!(s["name"], "io.refleet.test/room");
    assert_eq!(s["appId"], "io.refleet.test");
    assert_eq!(s["users"], 2);
    r.drain_and_stop().await;
}
