//! Crash recovery and fencing: a running session is checkpointed every
//! `--checkpoint-interval`; after a `kill -9` another reflector resumes it from the last
//! checkpoint on a fresh timeline (nothing a checkpoint had is lost); and a reflector whose
//! session was taken over while it was cut off is fenced: it closes its clients and never
//! overwrites the new host's state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{Client, payloads, start_with, temp_storage};

#[tokio::test]
async fn after_kill_9_another_reflector_resumes_from_the_last_checkpoint_on_a_fresh_timeline() {
    let (_d, dir) = temp_storage();
    let (process, addr) = support::start_process(
        &["--storage", &dir, "--checkpoint-interval", "100ms"],
        &[],
        std::process::Stdio::null(),
    );
    let mut a = Client::connect(&addr, "crashing").await;
    let first = a.join("a").await;
    for i in 0..10 {
        a.send_msg(&format!("m{i}")).await;
    }
    for _ in 0..10 {
        a.next_client_recv().await;
    }
    // Several checkpoint intervals: the ten messages are in a checkpoint by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(process); // SIGKILL: nothing is stored on the way out.
    assert!(matches!(a.expect_close().await, 1006 | 1000 | 4003));

    let b_host = start_with(&dir, &[]).await;
    let mut again = Client::connect(&b_host, "crashing").await;
    let sync = again.join("a").await;
    assert_ne!(
        sync["timeline"], first["timeline"],
        "a checkpoint resumes on a fresh timeline"
    );
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(
        payloads(&sync),
        want,
        "every checkpointed message, in order"
    );
    again.send_msg("after the crash").await;
    assert_eq!(again.next_client_recv().await[2], "after the crash");
    let metrics = b_host.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "refleet_reflector_checkpoints_total{outcome=\"resumed\"}"
        ),
        1.0
    );
    // Ended cleanly, the next resume continues this timeline.
    let timeline = sync["timeline"].clone();
    drop(again);
    b_host.drain_and_stop().await;
    let c_host = start_with(&dir, &[]).await;
    let mut c = Client::connect(&c_host, "crashing").await;
    assert_eq!(c.join("a").await["timeline"], timeline);
    c_host.drain_and_stop().await;
}

#[tokio::test]
async fn a_reflector_whose_session_was_taken_over_is_fenced_and_never_overwrites_it() {
    let (_d, dir) = temp_storage();
    let old = start_with(&dir, &["--checkpoint-interval", "100ms"]).await;
    let mut stale = Client::connect(&old, "split").await;
    stale.join("a").await;
    stale.send_msg("before").await;
    stale.next_client_recv().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Another reflector resumes the session while the old one still runs (it was cut off
    // from the operator and presumed gone).
    let new = start_with(&dir, &["--checkpoint-interval", "100ms"]).await;
    let mut b = Client::connect(&new, "split").await;
    let taken = b.join("b").await;
    b.send_msg("on the new host").await;
    b.next_client_recv().await;

    // The old host's next checkpoint finds the newer claim: it closes its clients.
    stale.send_msg("written on the stale host").await;
    assert_eq!(stale.expect_close().await, 4003);
    let metrics = old.metrics().await;
    assert_eq!(
        support::metric(
            &metrics,
            "refleet_reflector_checkpoints_total{outcome=\"fenced\"}"
        ),
        1.0
    );
    // What is stored is the new host's: a later resume continues its timeline and history.
    drop(b);
    new.drain_and_stop().await;
    old.drain_and_stop().await;
    let next = start_with(&dir, &[]).await;
    let mut c = Client::connect(&next, "split").await;
    let sync = c.join("a").await;
    assert_eq!(sync["timeline"], taken["timeline"]);
    let got = payloads(&sync);
    assert!(got.contains(&"on the new host".to_owned()), "{got:?}");
    assert!(
        !got.contains(&"written on the stale host".to_owned()),
        "{got:?}"
    );
    next.drain_and_stop().await;
}
