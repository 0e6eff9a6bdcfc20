//! Join tokens over real WebSockets: each bad-token case is refused with 4103 and counted,
//! a valid token admits, an admitted view comes back after its token expired, and a shard
//! at its hard cap refuses with 4105.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use refleet_api::token::{JoinClaims, Signer, Verifier};
use support::{Client, metric, start_with, temp_storage};

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(shard: &str, expires_at: i64, max_users: u32) -> JoinClaims {
    JoinClaims {
        app_id: "io.refleet.test".into(),
        shard: shard.into(),
        persistence: true,
        expires_at,
        key_id: String::new(),
        max_users,
        reservation_id: 1,
    }
}

/// A reflector that requires join tokens signed by the returned key (key id `k1`).
async fn with_tokens() -> (Signer, tempfile::TempDir, support::TestReflector) {
    let signer = Signer::new("k1", &[9; 32]);
    let keys = Verifier::format_key("k1", &signer.public_key());
    let (dir, storage) = temp_storage();
    let r = start_with(&storage, &["--require-join-token", "--token-keys", &keys]).await;
    (signer, dir, r)
}

#[tokio::test]
async fn tokens_admit_matching_first_joins_and_refuse_the_rest() {
    let (signer, _dir, r) = with_tokens().await;

    let good = signer.sign(claims("room", now() + 60, 3));
    let mut alice = Client::connect_path(&r, &format!("/reflector/{good}/s1"), "s1").await;
    alice.join("alice").await;

    let forged = Signer::new("k1", &[1; 32]).sign(claims("room", now() + 60, 3));
    let unknown_key = Signer::new("k2", &[9; 32]).sign(claims("room", now() + 60, 3));
    let cases = [
        ("missing", "/reflector/s1".to_owned(), "missing_token"),
        (
            "garbage",
            "/reflector/not.a-token/s1".to_owned(),
            "invalid_token",
        ),
        ("no token segment", "/s1".to_owned(), "missing_token"),
        ("forged", format!("/reflector/{forged}/s1"), "invalid_token"),
        (
            "unknown key",
            format!("/reflector/{unknown_key}/s1"),
            "invalid_token",
        ),
        (
            "expired",
            format!(
                "/reflector/{}/s1",
                signer.sign(claims("room", now() - 1, 3))
            ),
            "expired_token",
        ),
        (
            "other shard",
            format!(
                "/reflector/{}/s1",
                signer.sign(claims("room~2", now() + 60, 3))
            ),
            "wrong_shard",
        ),
    ];
    for (what, path, reason) in cases {
        let before = metric(
            &r.metrics().await,
            &format!("refleet_reflector_join_refusals_total{{reason=\"{reason}\"}}"),
        );
        let mut c = Client::connect_path(&r, &path, "s1").await;
        c.send_json(
            serde_json::json!({"id": "s1", "action": "JOIN", "args": Client::join_args(what)}),
        )
        .await;
        assert_eq!(c.expect_close().await, 4103, "{what}");
        let after = metric(
            &r.metrics().await,
            &format!("refleet_reflector_join_refusals_total{{reason=\"{reason}\"}}"),
        );
        assert_eq!(after, before + 1.0, "{what} counted as {reason}");
    }

    // An admitted view reconnects with a URL whose token has expired since.
    let short = signer.sign(claims("room", now() + 2, 3));
    let mut bob = Client::connect_path(&r, &format!("/reflector/{short}/s1"), "s1").await;
    bob.join("bob").await;
    bob.close().await;
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let mut bob = Client::connect_path(&r, &format!("/reflector/{short}/s1"), "s1").await;
    bob.join("bob").await;

    // alice and bob are members; the cap of 3 leaves room for one more, then 4105.
    let mut carol = Client::connect_path(&r, &format!("/reflector/{good}/s1"), "s1").await;
    carol.join("carol").await;
    let mut dave = Client::connect_path(&r, &format!("/reflector/{good}/s1"), "s1").await;
    dave.send_json(
        serde_json::json!({"id": "s1", "action": "JOIN", "args": Client::join_args("dave")}),
    )
    .await;
    assert_eq!(dave.expect_close().await, 4105);
    // The members were not disturbed.
    alice.send_msg("still here").await;
    assert_eq!(carol.next_client_recv().await[2], "still here");
}

#[tokio::test]
async fn a_token_with_persistence_off_keeps_no_persistent_data() {
    let (signer, _dir, r) = with_tokens().await;
    let token = |persistence: bool| {
        signer.sign(JoinClaims {
            persistence,
            ..claims("room", now() + 60, 10)
        })
    };
    let skipped = |text: &str| {
        metric(
            text,
            "refleet_reflector_persistence_operations_total{op=\"skipped\"}",
        )
    };
    let before = skipped(&r.metrics().await);

    // Persistence off: the look-up is skipped and the SAVE is dropped.
    let off = token(false);
    let mut v1 = Client::connect_path(&r, &format!("/reflector/{off}/v1"), "v1").await;
    v1.join("a").await;
    let saved = format!("{}/apps/io.refleet.test/pid-1/save/hash1", r.files_base());
    v1.send_json(serde_json::json!({"id": "v1", "action": "SAVE", "args": {"persistTime": 10, "url": saved, "dissident": null}}))
        .await;
    v1.send_msg("sync point").await;
    v1.next_client_recv().await;
    assert_eq!(
        skipped(&r.metrics().await),
        before + 2.0,
        "look-up and SAVE skipped"
    );

    // Persistence on, same persistentId: nothing was kept.
    let on = token(true);
    let mut v2 = Client::connect_path(&r, &format!("/reflector/{on}/v2"), "v2").await;
    let sync = v2.join("b").await;
    assert!(sync.get("persisted").is_none(), "{sync}");
    // With persistence on, the SAVE is recorded and the next session finds it.
    v2.send_json(serde_json::json!({"id": "v2", "action": "SAVE", "args": {"persistTime": 10, "url": saved, "dissident": null}}))
        .await;
    v2.send_msg("sync point").await;
    v2.next_client_recv().await;
    let found = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut i = 0;
        loop {
            i += 1;
            // A fresh session each time: a session looks persisted data up at its first JOIN.
            let id = format!("v3-{i}");
            let mut v3 = Client::connect_path(&r, &format!("/reflector/{on}/{id}"), &id).await;
            let sync = v3.join("c").await;
            if sync.get("persisted").is_some() {
                return sync;
            }
            v3.close().await;
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the SAVE of a persistent shard is kept");
    assert_eq!(found["url"], saved.as_str());
}
