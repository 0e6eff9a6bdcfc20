//! What a session may record and prune: SNAP and SAVE URLs only under the session's own
//! prefix on this reflector's files base; and `/sessions` only for the operator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use support::{Client, metric, start_with, temp_storage};

/// Joins `session` as app `app` with persistentId `pid`.
async fn join_as(r: &support::TestReflector, session: &str, app: &str, pid: &str) -> Client {
    let mut c = Client::connect(r, session).await;
    let mut args = Client::join_args("u");
    args["appId"] = json!(app);
    args["name"] = json!(format!("{app}/room"));
    args["persistentId"] = json!(pid);
    c.join_with(args).await;
    c
}

/// Sends a SEND and waits for it to come back: everything sent before it on this
/// connection has been handled by the session.
async fn barrier(c: &mut Client, marker: &str) {
    c.send_msg(marker).await;
    loop {
        if c.next_client_recv().await[2] == marker {
            return;
        }
    }
}

#[tokio::test]
async fn save_records_only_urls_under_the_sessions_own_prefix() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let base = r.files_base();
    let mut a = join_as(&r, "attacker", "io.refleet.test", "pid-1").await;
    for url in [
        // Another app's persisted data, another persistentId, another files base.
        format!("{base}/apps/com.victim/pid-1/save/h"),
        format!("{base}/apps/io.refleet.test/pid-2/save/h"),
        "http://evil.example/files/apps/io.refleet.test/pid-1/save/h".to_string(),
        format!("{base}/apps/io.refleet.test/snap/c/pid-1.attacker/1_1.h"),
    ] {
        a.send_json(
            json!({"id": "attacker", "action": "SAVE", "args": {"persistTime": 1, "url": url}}),
        )
        .await;
    }
    barrier(&mut a, "after the SAVEs").await;
    let metrics = r.metrics().await;
    a.close().await;
    // Stopping waits for the session's storage writes: none of those SAVEs was recorded.
    r.drain_and_stop().await;
    let record =
        std::path::Path::new(&dir).join("persisted/unknown_dev_id/io.refleet.test/pid-1.json");
    assert!(!record.exists(), "{record:?} was written");
    assert_eq!(
        metric(
            &metrics,
            "refleet_reflector_stored_url_refusals_total{action=\"SAVE\",reason=\"foreign_prefix\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &metrics,
            "refleet_reflector_stored_url_refusals_total{action=\"SAVE\",reason=\"foreign_base\"}"
        ),
        1.0
    );

    // The session's own prefix is still recorded.
    let r = start_with(&dir, &[]).await;
    let base = r.files_base();
    let mut a = join_as(&r, "owner", "io.refleet.test", "pid-1").await;
    let own = format!("{base}/apps/io.refleet.test/pid-1/save/h");
    a.send_json(json!({"id": "owner", "action": "SAVE", "args": {"persistTime": 1, "url": own}}))
        .await;
    barrier(&mut a, "after the SAVE").await;
    a.close().await;
    r.drain_and_stop().await;
    let text = std::fs::read_to_string(&record).expect("record");
    assert!(text.contains(&own), "{text}");
}

#[tokio::test]
async fn snap_cannot_name_or_prune_another_sessions_snapshots() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--snapshot-retention", "1"]).await;
    let http = reqwest::Client::new();
    let base = r.files_base();
    // The victim's session stores four snapshots.
    let v = join_as(&r, "victim", "com.victim", "vpid").await;
    let victim = |t: u32| format!("{base}/apps/com.victim/snap/code1/vpid.victim/{t:010}_{t}.h{t}");
    for t in 1..=4 {
        assert_eq!(
            http.put(victim(t))
                .body(format!("v{t}"))
                .send()
                .await
                .unwrap()
                .status(),
            201
        );
    }
    // A member of another session announces the victim's newest snapshot as its own.
    let mut a = join_as(&r, "attacker", "io.refleet.test", "pid-1").await;
    a.send_json(json!({"id": "attacker", "action": "SNAP", "args": {"time": 100, "seq": 1, "url": victim(4)}}))
        .await;
    a.send_json(json!({"id": "attacker", "action": "SNAP", "args": {"time": 200, "seq": 2, "url": "http://evil.example/files/apps/io.refleet.test/snap/code1/pid-1.attacker/1_1.h"}}))
        .await;
    barrier(&mut a, "after the SNAPs").await;
    // A late joiner of the attacker's session is not sent the victim's snapshot.
    let mut late = Client::connect(&r, "attacker").await;
    let sync = late.join("late").await;
    let url = sync["url"].as_str().unwrap_or_default();
    assert!(url.is_empty(), "late joiner got {url}");
    let metrics = r.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "refleet_reflector_stored_url_refusals_total{action=\"SNAP\",reason=\"foreign_prefix\"}"
        ),
        1.0
    );
    a.close().await;
    late.close().await;
    v.close().await;
    // Stopping waits for pruning: the victim's snapshots are all still there.
    r.drain_and_stop().await;
    for t in 1..=4 {
        let file = std::path::Path::new(&dir).join(format!(
            "files/apps/com.victim/snap/code1/vpid.victim/{t:010}_{t}.h{t}"
        ));
        assert!(file.exists(), "{file:?} was pruned");
    }
}

/// A non-loopback address of this machine, if it has one (found without sending anything).
fn outside_address() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket only picks a route and a source address.
    ["198.51.100.1:9", "10.1.2.3:9", "192.168.1.1:9"]
        .iter()
        .find_map(|target| {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
            s.connect(target).ok()?;
            let ip = s.local_addr().ok()?.ip();
            (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
        })
}

#[tokio::test]
async fn sessions_are_listed_only_for_the_operator() {
    let Some(ip) = outside_address() else {
        eprintln!("skipped: this machine has no non-loopback address to test from");
        return;
    };
    let (_d, dir) = temp_storage();
    let r = support::start_on("0.0.0.0:0", &dir, &["--report-token", "s3cret"]).await;
    let mut a = Client::connect(&r, "listed").await;
    a.join("a").await;
    let outside = format!("http://{ip}:{}/sessions", r.addr.port());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    assert_eq!(http.get(&outside).send().await.unwrap().status(), 403);
    assert_eq!(
        http.get(&outside)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let ok = http
        .get(&outside)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().contains("listed"));
    // On the same machine (or pod), no secret is needed.
    let local = format!("http://127.0.0.1:{}/sessions", r.addr.port());
    assert_eq!(http.get(&local).send().await.unwrap().status(), 200);
    a.close().await;
    r.drain_and_stop().await;
}
