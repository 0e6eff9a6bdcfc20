//! Fuzz target `join`: JOIN admission in the reflector, the way a connection and its session
//! run it: the token in the WebSocket path (`Admission::check_path`), the JOIN frame
//! (`frame::parse`), the shard it names (`session::shard_of`), then `Admission::precheck`
//! and `Admission::decide` against an optional session binding, with tokens required or not.
//!
//! Inputs: paths carrying genuine tokens (right and wrong app/shard, expired, another key id,
//! the right key id with a forged key), damaged tokens and arbitrary text; JOINs naming apps
//! and shards from a small colliding set; bindings, members, clock and the "known view" flag.
//!
//! Properties: no panic; with tokens required, a precheck or a new view's admission passes
//! only with a token text the router's key really signed, for exactly the app and shard the
//! JOIN names, and (for `decide`) before its expiry; a session bound to another identity
//! refuses with `wrong_session` whatever the token; an admission never leaves the shard over
//! its cap, and a binding's cap is never replaced by a token's; every refusal is 4103 with a
//! documented reason or 4105 `shard_full`, with a close reason of at most 123 bytes; the
//! stored proof fingerprint round-trips through hex and its parser accepts only its output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;

use refleet_api::token::{JoinClaims, Signer, Verifier};
use refleet_fuzz::{Arbitrary, Unstructured, mutate, word};
use refleet_reflector::admission::{
    Admission, Binding, Presented, Proof, Refusal, Requested, ShardSettings, token_segment,
};
use refleet_reflector::connection::session_id_from_path;
use refleet_reflector::frame::{self, ClientMsg};
use refleet_reflector::session::shard_of;
use serde_json::{Map, Value};

type R<T> = arbitrary::Result<T>;

const APPS: &[&str] = &["app", "other", "", "app/x", "ap"];
const SHARDS: &[&str] = &["lobby", "lobby~1", "x", "", "a/b", "p"];
const NOWS: &[i64] = &[0, 49, 50, 99, 100, 101, 10_000_000];
const REASONS: &[&str] = &[
    "missing_token",
    "invalid_token",
    "expired_token",
    "wrong_shard",
    "wrong_session",
    "shard_full",
];

struct World {
    required: Arc<Admission>,
    open: Arc<Admission>,
    /// Tokens, each with its claims (as signed) and whether the router's key signed it.
    tokens: Vec<(String, JoinClaims, bool)>,
    genuine: HashSet<String>,
}

fn world() -> World {
    let router = Signer::new("k1", &[3; 32]);
    let forged = Signer::new("k1", &[4; 32]);
    let unknown = Signer::new("k2", &[5; 32]);
    let mut verifier = Verifier::default();
    verifier.insert("k1", &router.public_key()).unwrap();
    let (required, open) = (
        Admission::new(true, verifier.clone()),
        Admission::new(false, verifier),
    );
    for a in [&required, &open] {
        a.set_shard(
            "lobby",
            ShardSettings {
                max_users: 3,
                persistence: true,
            },
        );
    }
    let mut tokens = Vec::new();
    for app in APPS {
        for shard in SHARDS {
            for (i, signer) in [&router, &router, &forged, &unknown]
                .into_iter()
                .enumerate()
            {
                let claims = JoinClaims {
                    app_id: (*app).into(),
                    shard: (*shard).into(),
                    persistence: i % 2 == 0,
                    expires_at: if i == 0 { 100 } else { 50 },
                    key_id: signer.key_id().into(),
                    max_users: (i as u32) * 2,
                    reservation_id: i as u64,
                };
                let text = signer.sign(claims.clone());
                tokens.push((text, claims, i < 2));
            }
        }
    }
    let genuine = tokens.iter().filter(|t| t.2).map(|t| t.0.clone()).collect();
    World {
        required,
        open,
        tokens,
        genuine,
    }
}

/// A WebSocket path with a token segment (or none), and its session id.
fn path(u: &mut Unstructured<'_>, w: &World) -> R<String> {
    let token = match u.int_in_range(0..=5u8)? {
        0 => String::new(),
        1 => <&str>::arbitrary(u)?.to_owned(),
        2 => {
            let t = &u.choose(&w.tokens)?.0;
            mutate(u, t)?
        }
        _ => u.choose(&w.tokens)?.0.clone(),
    };
    let prefix = word(u, &["", "r", "reflector/eu", "a.b"])?;
    let sid = word(u, &["sid", "0123abcd", "", "x.y"])?;
    let mut p = String::new();
    if !prefix.is_empty() {
        p.push('/');
        p.push_str(&prefix);
    }
    if !token.is_empty() || u.arbitrary()? {
        p.push('/');
        p.push_str(&token);
    }
    p.push('/');
    p.push_str(&sid);
    if u.ratio(1u8, 8u8)? {
        p = mutate(u, &p)?;
    }
    Ok(p)
}

/// A JOIN frame naming an app and shard from the colliding sets.
fn join_frame(u: &mut Unstructured<'_>) -> R<String> {
    let mut args = Map::new();
    args.insert("version".into(), Value::from(1));
    args.insert("apiKey".into(), Value::from("k"));
    let app = word(u, APPS)?;
    if u.ratio(7u8, 8u8)? {
        args.insert("appId".into(), Value::from(app.clone()));
    }
    let name = match u.int_in_range(0..=3u8)? {
        0 => word(u, SHARDS)?,
        1 => format!("{}/{}", word(u, APPS)?, word(u, SHARDS)?),
        _ => format!("{app}/{}", word(u, SHARDS)?),
    };
    if u.ratio(7u8, 8u8)? {
        args.insert("name".into(), Value::from(name));
    }
    let text = serde_json::json!({"action": "JOIN", "args": args}).to_string();
    Ok(if u.ratio(1u8, 16u8)? {
        mutate(u, &text)?
    } else {
        text
    })
}

fn check_refusal(r: &Refusal) {
    assert!(REASONS.contains(&r.reason), "unknown reason {:?}", r.reason);
    assert_eq!(
        r.close.code == 4105,
        r.reason == "shard_full",
        "{} with {}",
        r.reason,
        r.close.code
    );
    assert!([4103, 4105].contains(&r.close.code), "{r:?}");
    assert!(r.close.reason.len() <= 123, "close reason too long: {r:?}");
}

fn one(u: &mut Unstructured<'_>, w: &World) -> R<()> {
    let required: bool = u.arbitrary()?;
    let adm = if required { &w.required } else { &w.open };
    let path = path(u, w)?;
    assert!(!session_id_from_path(&path).contains('/'));
    let segment = token_segment(&path);
    let presented = adm.check_path(&path);
    if !segment.contains('.') {
        assert_eq!(presented.is_some(), required, "{path:?}");
    }
    if let Some(p) = &presented
        && let Ok(claims) = &p.check
    {
        assert!(
            w.genuine.contains(segment),
            "{segment:?} verified but was never signed by the router's key"
        );
        assert!(w.tokens.iter().any(|t| t.0 == segment && &t.1 == claims));
    }
    let presented: Option<&Presented> = presented.as_deref();

    let text = join_frame(u)?;
    let Ok(ClientMsg::Join(join)) = frame::parse(&text) else {
        return Ok(());
    };
    let req = Requested {
        app_id: join.app_id.as_deref().unwrap_or(""),
        shard: shard_of(&join),
    };
    let token_for_req = |c: &JoinClaims| c.app_id == req.app_id && c.shard == req.shard;
    let genuine_claims = || match presented.map(|p| &p.check) {
        Some(Ok(c)) => Some(c),
        _ => None,
    };

    match adm.precheck(presented, req) {
        Ok(()) => {
            if required {
                let c = genuine_claims().expect("precheck passed without a valid token");
                assert!(
                    token_for_req(c),
                    "precheck passed a token for {c:?} to {req:?}"
                );
            }
        }
        Err(r) => {
            assert!(required, "an open reflector refused a precheck: {r:?}");
            check_refusal(&r);
        }
    }

    let binding = if u.arbitrary()? {
        Some(Binding {
            app_id: word(u, APPS)?,
            shard: word(u, SHARDS)?,
            max_users: u.int_in_range(0..=4)?,
            persistence: u.arbitrary()?,
        })
    } else {
        None
    };
    let known_view: bool = u.arbitrary()?;
    let users = u.int_in_range(0..=5usize)?;
    let now = *u.choose(NOWS)?;
    match adm.decide(presented, req, binding.as_ref(), known_view, users, now) {
        Ok(admitted) => {
            if let Some(b) = &binding {
                assert!(b.admits(req.app_id, req.shard));
            }
            if !known_view {
                let cap = admitted.max_users as usize;
                assert!(
                    cap == 0 || users < cap,
                    "{users} users admitted at cap {cap}"
                );
                if let Some(b) = binding.as_ref().filter(|b| b.max_users > 0) {
                    assert_eq!(admitted.max_users, b.max_users, "a token replaced the cap");
                }
                if required {
                    let c = genuine_claims().expect("a new view admitted without a token");
                    assert!(token_for_req(c), "admitted {c:?} to {req:?}");
                    assert!(
                        now < c.expires_at,
                        "admitted an expired token at {now}: {c:?}"
                    );
                }
            }
        }
        Err(r) => {
            check_refusal(&r);
            if let Some(b) = &binding {
                assert_eq!(
                    !b.admits(req.app_id, req.shard),
                    r.reason == "wrong_session",
                    "{r:?}"
                );
            }
            if known_view {
                assert_eq!(r.reason, "wrong_session", "a known view refused: {r:?}");
            }
            if !required {
                assert!(["wrong_session", "shard_full"].contains(&r.reason), "{r:?}");
            }
        }
    }

    // The proof fingerprint kept in session state.
    if let Some(p) = presented {
        assert_eq!(Proof::from_hex(&p.proof.to_hex()), Some(p.proof));
    }
    let hex = if u.arbitrary()? {
        <&str>::arbitrary(u)?.to_owned()
    } else {
        let bytes: [u8; 16] = u.arbitrary()?;
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        mutate(u, &text)?
    };
    if let Some(p) = Proof::from_hex(&hex) {
        assert_eq!(
            p.to_hex(),
            hex.to_ascii_lowercase(),
            "{hex:?} is not a proof's hex"
        );
    }
    Ok(())
}

#[test]
fn fuzz_join() {
    let w = world();
    refleet_fuzz::run("join", 300, |u| one(u, &w));
}
