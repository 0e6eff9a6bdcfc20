//! The WebSocket layer itself: the close handshake, per-connection byte bounds and the tick
//! clamp, seen from a client on a real socket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures_util::StreamExt;
use support::{Client, start_with, temp_storage};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Sends a close frame and returns the close frame the reflector answers with (`None` when
/// the connection ended without one, which the client reports as 1006).
async fn close_and_read_answer(c: &mut Client) -> Option<CloseFrame> {
    c.ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close sent");
    loop {
        let item = tokio::time::timeout(support::STEP, c.ws.next())
            .await
            .expect("the reflector answers or ends the connection in time");
        match item {
            // Frames the reflector queued before it saw the close may still arrive.
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(frame))) => return frame,
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn a_clients_close_is_answered_with_a_close_frame() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    // A joined client leaving, as `Session.leave()` does.
    let mut a = Client::connect(&r, "bye").await;
    a.join("a").await;
    let answer = close_and_read_answer(&mut a).await;
    assert_eq!(
        answer.map(|f| u16::from(f.code)),
        Some(1000),
        "the reflector echoes the client's close code"
    );
    // The answer comes before the end of the connection.
    let end = tokio::time::timeout(support::STEP, a.ws.next())
        .await
        .expect("ended in time");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_)))),
        "nothing after the close"
    );
    // A connection that never joined gets the same answer.
    let mut b = Client::connect(&r, "bye").await;
    let answer = close_and_read_answer(&mut b).await;
    assert_eq!(answer.map(|f| u16::from(f.code)), Some(1000));
    r.drain_and_stop().await;
}

/// TICKs received within `window` (other frames are skipped).
async fn count_ticks(c: &mut Client, window: std::time::Duration) -> u32 {
    let end = tokio::time::Instant::now() + window;
    let mut ticks = 0;
    while let Ok(item) = tokio::time::timeout_at(end, c.ws.next()).await {
        match item {
            Some(Ok(Message::Text(t))) if t.contains("\"action\":\"TICK\"") => ticks += 1,
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("connection ended while counting ticks: {other:?}"),
        }
    }
    ticks
}

#[tokio::test]
async fn a_one_millisecond_tick_request_is_clamped() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    // In the JOIN that creates the session.
    let mut a = Client::connect(&r, "fast-ticks").await;
    let mut args = Client::join_args("a");
    args["ticks"] = serde_json::json!({"tick": 1, "delay": 0});
    a.join_with(args).await;
    let ticks = count_ticks(&mut a, std::time::Duration::from_secs(1)).await;
    // The clamp allows 1000/16 ≈ 62 a second; unclamped it was hundreds.
    assert!(
        (5..=100).contains(&ticks),
        "ticks in one second with tick 1 requested: {ticks}"
    );
    // And in a TICKS message to a running session.
    a.send_json(serde_json::json!({"id": "fast-ticks", "action": "TICKS", "args": {"tick": 0.5}}))
        .await;
    let ticks = count_ticks(&mut a, std::time::Duration::from_secs(1)).await;
    assert!(
        (5..=100).contains(&ticks),
        "ticks in one second after TICKS 0.5: {ticks}"
    );
    r.drain_and_stop().await;
}

#[tokio::test]
async fn a_slow_reader_is_cut_once_its_queue_holds_too_many_bytes() {
    const BOUND: f64 = (4 << 20) as f64;
    let (_d, dir) = temp_storage();
    let r = start_with(
        &dir,
        &[
            "--max-frame-bytes",
            "2097152",
            "--max-queued-bytes",
            "4194304",
        ],
    )
    .await;
    let mut fast = Client::connect(&r, "bytes").await;
    fast.join("fast").await;
    let mut slow = Client::connect(&r, "bytes").await;
    slow.join("slow").await;
    // From here on the slow client reads nothing. Megabyte messages fill its socket buffers
    // (a few MiB on loopback), then its queue: far fewer frames than --send-queue allows.
    let mega = "x".repeat(1 << 20);
    let slow_cut = |text: &str| {
        support::metric(text, "refleet_reflector_slow_client_disconnects_total") >= 1.0
    };
    let mut sent = 0;
    let mut cut_at = None;
    // Until the slow reader is cut, and a few messages more.
    while cut_at.is_none_or(|at| sent < at + 3) {
        assert!(
            sent < 100,
            "the slow reader is still connected after {sent} MiB were sent to it"
        );
        let tag = format!("{sent}:");
        fast.send_msg(&format!("{tag}{mega}")).await;
        sent += 1;
        // The sender is unaffected: it gets every message, in order.
        assert!(
            fast.next_client_recv().await[2]
                .as_str()
                .unwrap()
                .starts_with(&tag),
            "in order"
        );
        if cut_at.is_none() && slow_cut(&r.metrics().await) {
            cut_at = Some(sent);
        }
    }
    let text = r.metrics().await;
    let peak = support::metric(&text, "refleet_reflector_send_queue_peak_bytes");
    assert!(
        ((1 << 20) as f64..=BOUND).contains(&peak),
        "the largest backlog of one connection stayed within the bound: {peak}"
    );
    // The others see it leave.
    while fast.next_users().await["left"] != serde_json::json!(["slow"]) {}
    // The slow client finds what its socket still held, then 4001, or the end of the
    // connection if the close frame could not get past its full socket.
    let code = loop {
        let item = tokio::time::timeout(std::time::Duration::from_secs(20), slow.ws.next())
            .await
            .expect("the slow client's connection ends");
        match item {
            Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(f))) => break f.map_or(1005, |f| u16::from(f.code)),
            Some(Ok(other)) => panic!("unexpected {other:?}"),
            Some(Err(_)) | None => break 1006,
        }
    };
    assert!(
        code == 4001 || code == 1006,
        "slow client closed with {code}"
    );
    r.drain_and_stop().await;
}
