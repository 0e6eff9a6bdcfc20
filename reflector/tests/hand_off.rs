//! Hand-off of a shard to another reflector (a planned move), over real WebSockets: the
//! sessions are stored with every message, their clients are sent on with 4003, the shard's
//! JOINs are refused here afterwards, and a reflector on the same storage resumes each
//! session on its timeline with its members. When storing fails the shard stays here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Client, payloads, start_on, start_with, temp_storage};

const APP: &str = "io.refleet.test";
/// The shard `Client::join_args` names ("io.refleet.test/room").
const SHARD: &str = "room";

#[tokio::test]
async fn a_handed_off_shard_resumes_on_another_reflector_with_every_message() {
    let (_d, dir) = temp_storage();
    let a_host = start_with(&dir, &[]).await;
    let mut a = Client::connect(&a_host, "moving").await;
    let first = a.join("a").await;
    let mut b = Client::connect(&a_host, "moving").await;
    b.join("b").await;
    for i in 0..20 {
        a.send_msg(&format!("m{i}")).await;
    }
    // Both saw every message before the move.
    for _ in 0..20 {
        b.next_client_recv().await;
    }
    // Another shard of the same app on the same reflector is not touched.
    let mut other = Client::connect(&a_host, "other").await;
    let mut args = Client::join_args("o");
    args["name"] = Value::from("io.refleet.test/elsewhere");
    other.join_with(args).await;

    // The clients answer the close while the store waits for them, as real clients do.
    let (handed, a_code, b_code) = tokio::join!(
        a_host.registry().hand_off(APP, SHARD),
        a.expect_close(),
        b.expect_close()
    );
    assert_eq!(handed, Ok(1), "one session of the shard was stored");
    assert_eq!((a_code, b_code), (4003, 4003));
    assert!(a_host.registry().is_fenced(APP, SHARD));
    assert!(!a_host.registry().is_fenced(APP, "elsewhere"));

    // A JOIN of the shard that still reaches the old host is sent on, not served.
    let mut late = Client::connect(&a_host, "moving").await;
    late.send_json(
        serde_json::json!({"id": "moving", "action": "JOIN", "args": Client::join_args("a")}),
    )
    .await;
    assert_eq!(late.expect_close().await, 4003);
    // The other shard still works here.
    other.send_msg("still here").await;
    assert_eq!(other.next_client_recv().await[2], "still here");

    // The new host resumes the session: same timeline, every message, members rejoin
    // without a join event (no model rebuilt).
    let b_host = start_on("127.0.0.1:0", &dir, &[]).await;
    let mut a2 = Client::connect(&b_host, "moving").await;
    let sync = a2.join("a").await;
    assert_eq!(sync["timeline"], first["timeline"], "same timeline");
    let got = payloads(&sync);
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message, in order");
    let mut b2 = Client::connect(&b_host, "moving").await;
    b2.join("b").await;
    a2.send_msg("after move").await;
    assert_eq!(b2.next_client_recv().await[2], "after move");
    let metrics = a_host.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "refleet_reflector_hand_offs_total{outcome=\"stored\"}"
        ),
        1.0
    );
    assert_eq!(
        support::metric(
            &metrics,
            "refleet_reflector_join_refusals_total{reason=\"shard_moved\"}"
        ),
        1.0
    );
    b_host.drain_and_stop().await;
}

#[tokio::test]
async fn a_hand_off_of_a_shard_with_no_live_session_is_vacuously_stored() {
    let (_d, dir) = temp_storage();
    let host = start_with(&dir, &[]).await;
    assert_eq!(host.registry().hand_off(APP, SHARD).await, Ok(0));
    // Asked twice (a retried instruction): still fine.
    assert_eq!(host.registry().hand_off(APP, SHARD).await, Ok(0));
    let metrics = host.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "refleet_reflector_hand_offs_total{outcome=\"stored\"}"
        ),
        2.0
    );
    host.drain_and_stop().await;
}

#[tokio::test]
async fn when_storing_fails_the_shard_stays_and_its_clients_rejoin_it() {
    let (_d, dir) = temp_storage();
    let host = start_with(&dir, &[]).await;
    let mut a = Client::connect(&host, "stuck").await;
    let first = a.join("a").await;
    a.send_msg("kept").await;
    assert_eq!(a.next_client_recv().await[2], "kept");
    // Storage breaks: where the session's record goes is a file, not a folder.
    let sessions = std::path::Path::new(&dir).join("sessions");
    let _ = std::fs::remove_dir_all(&sessions);
    std::fs::write(&sessions, b"not a folder").unwrap();

    let (handed, code) = tokio::join!(host.registry().hand_off(APP, SHARD), a.expect_close());
    assert!(handed.is_err(), "{handed:?}");
    assert_eq!(code, 4003, "the client was closed for the attempt");
    assert!(
        !host.registry().is_fenced(APP, SHARD),
        "a failed hand-off lifts the fence"
    );
    // It rejoins the same session here, seamlessly.
    let mut again = Client::connect(&host, "stuck").await;
    let sync = again.join("a").await;
    assert_eq!(sync["timeline"], first["timeline"]);
    assert!(payloads(&sync).contains(&"kept".to_owned()));
    again.send_msg("after").await;
    assert_eq!(again.next_client_recv().await[2], "after");
    let metrics = host.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "refleet_reflector_hand_offs_total{outcome=\"failed\"}"
        ),
        1.0
    );
    std::fs::remove_file(&sessions).unwrap();
    drop(again);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn a_shard_moved_back_is_taken_again_once_accepted() {
    let (_d, dir) = temp_storage();
    let host = start_with(&dir, &[]).await;
    let mut a = Client::connect(&host, "back").await;
    let first = a.join("a").await;
    a.send_msg("one").await;
    a.next_client_recv().await;
    let (handed, _) = tokio::join!(host.registry().hand_off(APP, SHARD), a.expect_close());
    assert_eq!(handed, Ok(1));
    // Moved back here: the router tells this reflector to take the shard again.
    assert!(host.registry().unfence(APP, SHARD));
    assert!(!host.registry().unfence(APP, SHARD), "once");
    let mut again = Client::connect(&host, "back").await;
    let sync = again.join("a").await;
    assert_eq!(
        sync["timeline"], first["timeline"],
        "resumed from the hand-off's store"
    );
    assert_eq!(payloads(&sync), vec!["one".to_owned()]);
    host.drain_and_stop().await;
}
