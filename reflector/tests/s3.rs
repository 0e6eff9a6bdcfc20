//! The S3 storage path against a real S3-compatible server on loopback (moto's server):
//! files, persisted data and stored sessions, and a session resumed by a second reflector
//! process on the same bucket.
//!
//! Needs `REFLEET_MOTO_SERVER` (the `moto_server` executable; `scripts/test` installs it).
//! Without it the test is skipped, unless `REFLEET_REQUIRE_S3=1` makes that a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use support::{Client, Killed};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_reflector(
    bucket_url: &str,
    endpoint: &str,
    extra: &[&str],
) -> (Killed, support::TestReflectorAddr) {
    let mut args = vec![
        "--storage",
        bucket_url,
        "--empty-session-ttl",
        "1s",
        "--drain-timeout",
        "1s",
    ];
    args.extend_from_slice(extra);
    support::start_process(
        &args,
        &[
            ("AWS_ENDPOINT", endpoint),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
        ],
        Stdio::inherit(),
    )
}

#[tokio::test]
async fn sessions_files_and_persisted_data_live_in_s3_and_move_between_reflectors() {
    let Ok(moto) = std::env::var("REFLEET_MOTO_SERVER") else {
        assert!(
            std::env::var("REFLEET_REQUIRE_S3").is_err(),
            "REFLEET_REQUIRE_S3 is set but REFLEET_MOTO_SERVER is not"
        );
        eprintln!("skipped: REFLEET_MOTO_SERVER is not set (scripts/test installs moto)");
        return;
    };
    let port = free_port();
    let _moto = Killed(
        Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server"),
    );
    let endpoint = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..100 {
        if let Ok(r) = http.put(format!("{endpoint}/refleet-test")).send().await
            && r.status().is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "moto server up and bucket created");
    let bucket_url = "s3://refleet-test/fleet-a";

    // Reflector 1: a session with a snapshot, a SAVE and messages after both.
    let (r1, a1) = start_reflector(bucket_url, &endpoint, &[]);
    let files = format!("http://{}/files", a1.0);
    let mut a = Client::connect(&a1, "s3-session").await;
    let first = a.join("a").await;
    // A large upload streams through a multipart staging object and is published once.
    let big_url =
        format!("{files}/apps/io.refleet.test/snap/code1/pid-1.s3-session/0000000001_1.big");
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i % 253) as u8).collect();
    assert_eq!(
        http.put(&big_url)
            .body(big.clone())
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    assert_eq!(
        http.put(&big_url)
            .body(big.clone())
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "an identical retry"
    );
    let mut changed = big.clone();
    changed[5_500_000] ^= 1;
    assert_eq!(
        http.put(&big_url)
            .body(changed)
            .send()
            .await
            .unwrap()
            .status(),
        409
    );
    let got = http
        .get(&big_url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(got.as_ref() == big.as_slice(), "the first bytes, whole");
    for i in 0..3 {
        a.send_msg(&format!("m{i}")).await;
    }
    let mut last = (0, 0);
    for _ in 0..3 {
        let m = a.next_client_recv().await;
        last = (m[0].as_u64().unwrap(), m[1].as_u64().unwrap());
    }
    let snap_url = format!(
        "{files}/apps/io.refleet.test/snap/code1/pid-1.s3-session/{:010}_{}.h",
        last.0, last.1
    );
    assert_eq!(
        http.put(&snap_url)
            .body("snapshot-bytes")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    a.send_json(json!({"id": "s3-session", "action": "SNAP", "args": {"time": last.0, "seq": last.1, "url": snap_url}})).await;
    let save_url = format!("{files}/apps/io.refleet.test/pid-1/save/datahash");
    assert_eq!(
        http.put(&save_url)
            .body("persisted-bytes")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    a.send_json(json!({"id": "s3-session", "action": "SAVE", "args": {"persistTime": last.0, "url": save_url}})).await;
    a.send_msg("after snapshot").await;
    a.next_client_recv().await;
    a.close().await;
    // The empty session is stored to S3 after its TTL (1 s, at least 2 s after the last leave).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    drop(r1);

    // Reflector 2, another process on the same bucket, resumes the session.
    let (_r2, a2) = start_reflector(bucket_url, &endpoint, &[]);
    let mut b = Client::connect(&a2, "s3-session").await;
    let sync = b.join("b").await;
    assert_eq!(
        sync["timeline"], first["timeline"],
        "resumed on the same timeline"
    );
    assert_eq!(sync["url"], snap_url.as_str());
    let kept: Vec<_> = sync["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m[2].clone())
        .collect();
    assert_eq!(kept, vec![json!("after snapshot")]);
    // Files written through reflector 1 are served by reflector 2.
    let snap_via_2 = snap_url.replace(&a1.0.to_string(), &a2.0.to_string());
    assert_eq!(
        http.get(&snap_via_2)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "snapshot-bytes"
    );
    // New code: new session id, same persistentId, starts from the saved data.
    let mut c = Client::connect(&a2, "s3-session-v2").await;
    let sync = c.join("c").await;
    assert_eq!(sync["url"], save_url.as_str());
    assert_eq!(sync["persisted"], true);
}
