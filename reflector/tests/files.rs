//! The files endpoint over HTTP: uploads only for live sessions, write-once snapshots,
//! size limits, path safety, CORS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Client, start_with, temp_storage};

#[tokio::test]
async fn uploads_follow_the_rules_and_downloads_return_the_bytes() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--max-upload-bytes", "1000"]).await;
    let http = reqwest::Client::new();
    let base = r.files_base();
    let snap =
        format!("{base}/apps/io.refleet.test/snap/code1/pid-1.files/0000000010_4294967290.hash");
    let save = format!("{base}/apps/io.refleet.test/pid-1/save/datahash");
    // No live session yet: refused.
    assert_eq!(
        http.put(&snap)
            .body("snapshot")
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let mut a = Client::connect(&r, "files").await;
    a.join("a").await;
    let put = http
        .put(&snap)
        .header("content-type", "application/octet-stream")
        .body("snapshot")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    assert_eq!(put.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        http.put(&snap)
            .body("snapshot")
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "an identical retry is fine"
    );
    assert_eq!(
        http.put(&snap)
            .body("changed!")
            .send()
            .await
            .unwrap()
            .status(),
        409,
        "snapshots are write-once"
    );
    let got = http.get(&snap).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "application/octet-stream");
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"snapshot");
    let head = http.head(&snap).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "8");
    // Persisted data may be written again (it is hash-addressed).
    assert_eq!(
        http.put(&save).body("v1").send().await.unwrap().status(),
        201
    );
    assert_eq!(
        http.put(&save).body("v2").send().await.unwrap().status(),
        200
    );
    assert_eq!(
        http.get(&save).send().await.unwrap().text().await.unwrap(),
        "v2"
    );
    // Another session's path, another app, a path that is no upload path.
    for foreign in [
        format!("{base}/apps/io.refleet.test/snap/code1/pid-1.other-session/0000000010_1.h"),
        format!("{base}/apps/other.app/pid-1/save/h"),
        format!("{base}/apps/io.refleet.test/pid-2/save/h"),
        format!("{base}/somewhere/else"),
    ] {
        assert_eq!(
            http.put(&foreign).body("x").send().await.unwrap().status(),
            403,
            "{foreign}"
        );
    }
    // Traversal and odd characters.
    for bad in [
        "apps/../../etc/passwd",
        "apps/%2e%2e/x",
        "apps//x",
        "apps/a%00b",
    ] {
        let url = format!("{base}/{bad}");
        let status = http.get(&url).send().await.unwrap().status();
        assert!(status == 400 || status == 404, "{bad}: {status}");
        assert_ne!(
            http.put(&url).body("x").send().await.unwrap().status(),
            201,
            "{bad}"
        );
    }
    // Too large: by header and by body.
    let big =
        format!("{base}/apps/io.refleet.test/snap/code1/pid-1.files/0000000011_4294967291.big");
    assert_eq!(
        http.put(&big)
            .body(vec![0u8; 2000])
            .send()
            .await
            .unwrap()
            .status(),
        413
    );
    assert_eq!(
        http.get(&big).send().await.unwrap().status(),
        404,
        "nothing stored"
    );
    // CORS preflight and unknown files.
    let pre = http
        .request(reqwest::Method::OPTIONS, &snap)
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success());
    assert!(
        pre.headers()["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("PUT")
    );
    assert_eq!(
        http.get(format!("{base}/apps/none/x"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(http.delete(&snap).send().await.unwrap().status(), 405);
    let metrics = r.metrics().await;
    assert!(
        support::metric(
            &metrics,
            "refleet_reflector_files_requests_total{method=\"PUT\",status=\"4xx\"}"
        ) >= 5.0
    );
    // The session whose paths were abused carries on: messages in order, and ticks.
    a.send_msg("one").await;
    a.send_msg("two").await;
    let (one, two) = (a.next_client_recv().await, a.next_client_recv().await);
    assert_eq!(
        (one[2].as_str(), two[2].as_str()),
        (Some("one"), Some("two"))
    );
    assert_eq!(
        two[1].as_u64().unwrap() as u32,
        (one[1].as_u64().unwrap() as u32).wrapping_add(1)
    );
    a.next_action("TICK").await;
    r.drain_and_stop().await;
}

#[tokio::test]
async fn old_snapshots_beyond_the_retention_are_pruned() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--snapshot-retention", "2"]).await;
    let http = reqwest::Client::new();
    let mut a = Client::connect(&r, "keep").await;
    a.join("a").await;
    let url = |t: u32| {
        format!(
            "{}/apps/io.refleet.test/snap/code1/pid-1.keep/{t:010}_{t}.h{t}",
            r.files_base()
        )
    };
    for t in 1..=4u32 {
        assert_eq!(
            http.put(url(t))
                .body(format!("s{t}"))
                .send()
                .await
                .unwrap()
                .status(),
            201
        );
        a.send_json(serde_json::json!({"id": "keep", "action": "SNAP", "args": {"time": t * 10, "seq": t, "url": url(t)}}))
            .await;
    }
    // Pruning runs beside the session; give it a moment.
    let mut remaining = 4;
    for _ in 0..50 {
        remaining = 0;
        for t in 1..=4u32 {
            if http.get(url(t)).send().await.unwrap().status() == 200 {
                remaining += 1;
            }
        }
        if remaining == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(remaining, 2);
    assert_eq!(
        http.get(url(4)).send().await.unwrap().status(),
        200,
        "the newest stays"
    );
    assert_eq!(http.get(url(3)).send().await.unwrap().status(), 200);
    r.drain_and_stop().await;
}
