//! The files endpoint over HTTP: uploads only for live sessions and from their members'
//! addresses, write-once files, size limits, idle timeouts and concurrency caps, path
//! safety, CORS.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use support::{Client, TestReflector, http_from, start_with, temp_storage};

/// The test's first client machine.
const HOST_A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// A second client machine (another loopback address).
const HOST_B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

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
    // Persisted data is named by the hash of its plaintext: a second PUT (the same data
    // encrypted again) succeeds, and the first bytes stay.
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
        "v1"
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

#[tokio::test]
async fn uploads_come_only_from_the_address_of_an_admitted_member() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let base = r.files_base();
    let snap = format!("{base}/apps/io.refleet.test/snap/code1/pid-1.mine/0000000010_4294967290.h");
    let save = format!("{base}/apps/io.refleet.test/pid-1/save/h");
    // A member joined from host A: the session is live.
    let mut a = Client::connect_from(&r, "mine", HOST_A).await;
    a.join("a").await;
    // Host B has no member in the session: no anonymous writes into its paths.
    let stranger = http_from(HOST_B);
    for url in [&snap, &save] {
        assert_eq!(
            stranger
                .put(url)
                .body("forged")
                .send()
                .await
                .unwrap()
                .status(),
            403,
            "{url}"
        );
        assert_eq!(
            stranger.get(url).send().await.unwrap().status(),
            404,
            "nothing stored"
        );
    }
    // The member's own machine may upload.
    let member = http_from(HOST_A);
    assert_eq!(
        member
            .put(&snap)
            .body("real")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    // Once B has a member of its own in the session, B may upload too.
    let mut b = Client::connect_from(&r, "mine", HOST_B).await;
    b.join("b").await;
    assert_eq!(
        stranger
            .put(&save)
            .body("data")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    // And when that member leaves, B may not any more.
    b.close().await;
    let later = format!("{base}/apps/io.refleet.test/pid-1/save/h2");
    let mut status = 0;
    for _ in 0..100 {
        status = stranger
            .put(&later)
            .body("x")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 403 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 403, "uploads stop with the member's connection");
    a.close().await;
    r.drain_and_stop().await;
}

#[tokio::test]
async fn files_are_write_once() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &[]).await;
    let http = reqwest::Client::new();
    let base = r.files_base();
    let mut a = Client::connect(&r, "once").await;
    a.join("a").await;
    let save = format!("{base}/apps/io.refleet.test/pid-1/save/datahash");
    assert_eq!(
        http.put(&save)
            .body("original")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    // A member's second PUT to the same persisted-data name does not replace it.
    let again = http.put(&save).body("overwrite").send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        http.get(&save).send().await.unwrap().text().await.unwrap(),
        "original"
    );
    // A snapshot is accepted again only with the same bytes.
    let snap = format!("{base}/apps/io.refleet.test/snap/code1/pid-1.once/0000000010_4294967290.h");
    assert_eq!(
        http.put(&snap).body("snap").send().await.unwrap().status(),
        201
    );
    assert_eq!(
        http.put(&snap).body("snap").send().await.unwrap().status(),
        200
    );
    assert_eq!(
        http.put(&snap).body("other").send().await.unwrap().status(),
        409
    );
    a.close().await;
    r.drain_and_stop().await;
}

/// Opens a PUT from `from` that declares `declared` bytes and sends only `sent` of them.
async fn stalled_put(r: &TestReflector, from: IpAddr, path: &str, declared: usize) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
    let mut tcp = socket.connect(r.addr).await.unwrap();
    let head = format!(
        "PUT /files/{path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/octet-stream\r\ncontent-length: {declared}\r\n\r\n",
        r.addr
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&[7u8; 10]).await.unwrap();
    tcp.flush().await.unwrap();
    tcp
}

/// The status line of the answer on `tcp`.
async fn status_line(tcp: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), tcp.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_stalled_upload_body_times_out_and_stores_nothing() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--upload-idle-timeout", "300ms"]).await;
    let mut a = Client::connect(&r, "stall").await;
    a.join("a").await;
    let path = "apps/io.refleet.test/snap/code1/pid-1.stall/0000000010_4294967290.h";
    let mut tcp = stalled_put(&r, HOST_A, path, 60 << 20).await;
    assert!(
        status_line(&mut tcp).await.starts_with("HTTP/1.1 408"),
        "the reflector gives up on the body"
    );
    let got = reqwest::get(format!("{}/{path}", r.files_base()))
        .await
        .unwrap();
    assert_eq!(got.status(), 404, "nothing stored");
    assert_eq!(
        support::metric(&r.metrics().await, "refleet_reflector_uploads_in_progress"),
        0.0
    );
    a.close().await;
    r.drain_and_stop().await;
}

async fn wait_for_uploads(r: &TestReflector, n: f64) {
    for _ in 0..200 {
        if support::metric(&r.metrics().await, "refleet_reflector_uploads_in_progress") == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("never {n} uploads in progress");
}

#[tokio::test]
async fn concurrent_uploads_are_capped_per_address_and_in_total() {
    let (_d, dir) = temp_storage();
    let r = start_with(
        &dir,
        &[
            "--max-uploads",
            "3",
            "--max-uploads-per-peer",
            "2",
            "--upload-idle-timeout",
            "60s",
        ],
    )
    .await;
    let mut a = Client::connect_from(&r, "cap", HOST_A).await;
    a.join("a").await;
    let mut b = Client::connect_from(&r, "cap", HOST_B).await;
    b.join("b").await;
    let path = |n: u32| format!("apps/io.refleet.test/snap/code1/pid-1.cap/{n:010}_{n}.h");
    // Two stalled uploads from A take A's share.
    let a1 = stalled_put(&r, HOST_A, &path(1), 60 << 20).await;
    let a2 = stalled_put(&r, HOST_A, &path(2), 60 << 20).await;
    wait_for_uploads(&r, 2.0).await;
    let from_a = http_from(HOST_A)
        .put(format!("{}/{}", r.files_base(), path(3)))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(from_a.status(), 429, "A is at its per-address cap");
    assert!(from_a.headers().contains_key("retry-after"));
    // B still has room, until the total is reached.
    let b1 = stalled_put(&r, HOST_B, &path(4), 60 << 20).await;
    wait_for_uploads(&r, 3.0).await;
    let from_b = http_from(HOST_B)
        .put(format!("{}/{}", r.files_base(), path(5)))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(from_b.status(), 503, "the total cap is reached");
    assert!(from_b.headers().contains_key("retry-after"));
    // A stalled client that goes away gives its slot back.
    drop(a1);
    wait_for_uploads(&r, 2.0).await;
    assert_eq!(
        http_from(HOST_A)
            .put(format!("{}/{}", r.files_base(), path(6)))
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    // The drain waits for requests in progress.
    drop((a2, b1));
    a.close().await;
    b.close().await;
    r.drain_and_stop().await;
}

#[tokio::test]
async fn large_uploads_stream_to_storage_within_the_size_cap() {
    let (_d, dir) = temp_storage();
    let r = start_with(&dir, &["--max-upload-bytes", "8000000"]).await;
    let http = reqwest::Client::new();
    let mut a = Client::connect(&r, "big").await;
    a.join("a").await;
    let url = |n: u32| {
        format!(
            "{}/apps/io.refleet.test/snap/code1/pid-1.big/{n:010}_{n}.h",
            r.files_base()
        )
    };
    // Larger than one staging part: streamed, then published under its name.
    let body: Vec<u8> = (0..7_000_000u32).map(|i| (i % 251) as u8).collect();
    let put = http.put(url(1)).body(body.clone()).send().await.unwrap();
    assert_eq!(put.status(), 201);
    let got = http
        .get(url(1))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got.as_ref() == body.as_slice(), "the same bytes come back");
    // Over the cap without a content-length (chunked): refused while streaming.
    let mut tcp = TcpStream::connect(r.addr).await.unwrap();
    let head = format!(
        "PUT /files/apps/io.refleet.test/snap/code1/pid-1.big/0000000002_2.h HTTP/1.1\r\nhost: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        r.addr
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![1u8; 64 * 1024];
    for _ in 0..130 {
        // The reflector may stop reading once the cap is passed.
        if tcp
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .is_err()
            || tcp.write_all(&chunk).await.is_err()
            || tcp.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = tcp.write_all(b"0\r\n\r\n").await;
    // The answer is 413, unless the reflector's close (with our unread excess) reset the
    // connection before we read it; either way nothing may be stored.
    let mut buf = vec![0u8; 512];
    if let Ok(Ok(n)) =
        tokio::time::timeout(std::time::Duration::from_secs(20), tcp.read(&mut buf)).await
        && n > 0
    {
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    }
    assert_eq!(http.get(url(2)).send().await.unwrap().status(), 404);
    a.close().await;
    r.drain_and_stop().await;
}
